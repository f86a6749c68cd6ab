"""The one YAML reader of the project: plain data only, no aliases, bounded size.

PyYAML's ``safe_load`` already refuses tags that build objects, but it follows anchors and aliases, so a
1 KB file whose values alias each other ("billion laughs") stands for gigabytes once anything walks it
(a JSON dump, a deep copy, a comparison).  Configs never need aliases, so :func:`load_yaml` refuses the
first one while composing, before any value is built, and refuses files over ``max_bytes`` unread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_YAML_BYTES", "YamlAliasError", "load_yaml"]

MAX_YAML_BYTES = 1 << 20  # 1 MiB: a config is a few KB


class YamlAliasError(yaml.YAMLError):
    """A YAML document uses an alias (``*name``), which config files must not."""


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops at the first alias event, before the node it refers to is reused."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlAliasError(f"aliases are not allowed in config files (alias *{event.anchor} at "
                                 f"{event.start_mark.line + 1}:{event.start_mark.column + 1}); write the value out")
        return super().compose_node(parent, index)


def load_yaml(path: str | os.PathLike, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The plain data (mappings, lists, scalars) of the YAML file ``path``; ``None`` for an empty file.

    Raises:
        yaml.YAMLError: invalid YAML, or an alias (:class:`YamlAliasError`).
        ValueError: the file is larger than ``max_bytes`` (checked before it is read).
        UnicodeDecodeError: the file is not UTF-8 text.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes, more than the {max_bytes} a YAML config may have")
    return yaml.load(path.read_bytes().decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
