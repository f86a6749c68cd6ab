"""Command-line flags generated from settings dataclasses, with YAML recipes and ``--config`` files underneath.

A command's settings are frozen dataclasses, one per ``--help`` group; each field is one flag (``max_steps`` is
``--max-steps``) declared with :func:`flag`, which holds its help text, its choices and, for a switch, its
``--no-...`` spelling.  A field without a default in code takes it from the command's packaged recipe
(``recipes/*.yaml``): the recipe, not the code, holds the paper's / DiT's / RMT's values.  Precedence: recipe,
then ``--config FILE`` (a path or a packaged recipe name), then the command line.

Each parsed value knows where it came from (:class:`FlagNamespace` ``.sources``: ``command line``,
``--config FILE``, ``recipe NAME`` or ``default``), so that a setting another layer also decides (the mixed
precision, which ``accelerate launch`` passes through the environment) can let a value from the command line
win over that layer and that layer win over a YAML or built-in default.

Why not ``transformers.HfArgumentParser`` (which the trainers used to be asked to use): it declares every flag
twice (``--max_steps, --max-steps`` in ``--help``), makes a switch ``--cpu [CPU]`` with an optional true/false
value, cannot give a flag another name (``--aa``, ``--no-flip``), and its YAML loading replaces the command line
instead of lying under it, with no type checks (``max_steps: 2.7`` would pass).  What the trainers need is
this one short module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..utils.errors import ConfigError
from ..utils.safe_yaml import load_yaml

__all__ = ["CALLER", "COMMAND_LINE", "DEFAULT", "EXPLICIT", "FlagNamespace", "FlagParser", "HelpFormatter",
           "add_flag_group", "build_parser", "flag", "flag_groups", "flag_table", "load_yaml_config", "parse_flags",
           "plain", "recipe_names", "settings_from_namespace"]

RECIPES = "recipes"  # the packaged recipe folder (sdt_diffusion/training/recipes)
# Where a flag's value came from (FlagNamespace.sources); a YAML layer is "recipe NAME" or "--config FILE".
COMMAND_LINE = "command line"
DEFAULT = "default"  # the code's default
CALLER = "caller"  # settings built in Python, not parsed: their values count as given
EXPLICIT = (COMMAND_LINE, CALLER)  # the sources that win over accelerate's own choice


def flag(default: Any = dataclasses.MISSING, help: str = "", *, name: str | None = None,
         negative: str | None = None, choices: Sequence[Any] | None = None, parse: Callable[[str], Any] | None = None,
         metavar: str | None = None) -> Any:
    """A settings field that is a flag: ``default`` (none: the recipe's), ``help``, another flag ``name`` than
    ``--<field-name>``, a switch's ``negative`` spelling (default ``--no-<field-name>``), ``choices``, and the
    ``parse`` function of its text (default: the field's type)."""
    metadata = {"help": help, "name": name, "negative": negative, "choices": choices, "parse": parse,
                "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(hint: Any) -> Any:
    """``int`` of ``int | None`` (and of ``Optional[int]``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def flag_groups(settings_class: type) -> list[tuple[str, type]]:
    """``(attribute, group dataclass)`` of a command's settings class, in ``--help`` order."""
    hints = typing.get_type_hints(settings_class)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(settings_class)
            if dataclasses.is_dataclass(hints[f.name])]


class _Switch(argparse.Action):
    """An on/off switch with two spellings (``--random-flip`` / ``--no-flip``): the negative one turns it off."""

    def __init__(self, option_strings: Sequence[str], dest: str, negative: str = "", **kwargs: Any) -> None:
        self.negative = negative
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, option_string != self.negative)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (``on``/``off`` for switches), except where there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.dest in ("help", "config"):
            return text
        shown = ("on" if action.default else "off") if isinstance(action, _Switch) else "%(default)s"
        return f"{text} (default: {shown})".lstrip()


_UNSET = object()  # a recipe field before the recipe is applied
_NOT_GIVEN = object()  # a flag the command line did not give (while parsing)


class FlagNamespace(argparse.Namespace):
    """Parsed flags, and ``sources``: where each flag's value came from (:data:`COMMAND_LINE`, ``--config FILE``,
    ``recipe NAME`` or :data:`DEFAULT`).  ``sources`` is a slot, not a flag: ``vars()`` and ``==`` see the flags
    only."""

    __slots__ = ("sources",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sources: dict[str, str] = {}


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that records where each value came from: the command line, or the layer that set its
    default (``default_sources``: ``recipe NAME``, ``--config FILE``; else :data:`DEFAULT`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_sources: dict[str, str] = {}

    def set_yaml_defaults(self, values: dict[str, Any], source: str) -> None:
        """``values`` (from :func:`load_yaml_config`) as defaults that came from ``source``."""
        self.set_defaults(**values)
        self.default_sources.update(dict.fromkeys(values, source))

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        namespace = FlagNamespace() if namespace is None else namespace
        # every flag not already in the namespace starts as _NOT_GIVEN: still so after parsing = not on the command
        # line; its default is then filled in as argparse would (a text default through the flag's type)
        actions: dict[str, argparse.Action] = {}
        for action in self._actions:  # the first action of a destination holds its default (argparse's rule)
            if action.dest != argparse.SUPPRESS and not hasattr(namespace, action.dest):
                actions.setdefault(action.dest, action)
        actions = {dest: a for dest, a in actions.items() if a.default is not argparse.SUPPRESS}
        for dest in actions:
            setattr(namespace, dest, _NOT_GIVEN)
        namespace, rest = super().parse_known_args(args, namespace)
        sources = {}
        for dest, action in actions.items():
            if getattr(namespace, dest) is not _NOT_GIVEN:
                sources[dest] = COMMAND_LINE
                continue
            sources[dest] = self.default_sources.get(dest, DEFAULT)
            default = action.default
            if isinstance(default, str):
                try:
                    default = self._get_value(action, default)
                except argparse.ArgumentError as e:
                    self.error(str(e))
            setattr(namespace, dest, default)
        if isinstance(namespace, FlagNamespace):
            namespace.sources = {**namespace.sources, **sources}
        return namespace, rest


def _add_field(group: Any, f: dataclasses.Field, hint: Any, helps: dict[str, str]) -> None:
    md = {**f.metadata, "help": helps.get(f.name, f.metadata.get("help", ""))}
    option = md.get("name") or "--" + f.name.replace("_", "-")
    default = _UNSET if f.default is dataclasses.MISSING else f.default
    if _base_type(hint) is bool:
        negative = md.get("negative") or "--no-" + f.name.replace("_", "-")
        group.add_argument(option, negative, dest=f.name, action=_Switch, negative=negative, default=default,
                           help=md.get("help", ""))
        return
    group.add_argument(option, dest=f.name, type=md.get("parse") or _base_type(hint), default=default,
                       choices=md.get("choices"), metavar=md.get("metavar"), help=md.get("help", ""))


def add_flag_group(parser: argparse.ArgumentParser, group_class: type, helps: dict[str, str] | None = None,
                   title: str | None = None) -> argparse._ArgumentGroup:
    """The flags of one settings group (a frozen dataclass of :func:`flag` fields, all with defaults in code when
    the parser has no recipe) as an argument group of ``parser``; commands without a settings class of their own
    (``sdt-export``) share groups this way."""
    group = parser.add_argument_group(title or getattr(group_class, "title", group_class.__name__))
    hints = typing.get_type_hints(group_class)
    for f in dataclasses.fields(group_class):
        _add_field(group, f, hints[f.name], helps or {})
    return group


def build_parser(settings_class: type, prog: str, description: str, recipe_name: str,
                 helps: dict[str, str] | None = None) -> FlagParser:
    """The parser of a command whose settings are ``settings_class``, its defaults completed by the packaged
    recipe ``recipe_name``; ``helps`` replaces the help text of shared flags where the command says more.

    Raises:
        ConfigError: the recipe leaves a field without a value (a packaging error).
    """
    parser = FlagParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file of flag values (keys = flag names) or a packaged recipe "
                             f"({', '.join(recipe_names())}); command-line flags override it")
    for attr, group_class in flag_groups(settings_class):
        add_flag_group(parser, group_class, helps, getattr(group_class, "title", attr))
    parser.set_yaml_defaults(load_yaml_config(_recipe_path(recipe_name), parser), f"recipe {recipe_name}")
    missing = [a.option_strings[0] for a in parser._actions if a.default is _UNSET]
    if missing:
        raise ConfigError(f"the recipe {recipe_name} gives no value for {missing}")
    return parser


def settings_from_namespace(settings_class: type, namespace: argparse.Namespace, **extra: Any) -> Any:
    """``settings_class`` with each flag group built from the parsed flags (``extra``: its other fields)."""
    values = vars(namespace)
    groups = {attr: group_class(**{f.name: values[f.name] for f in dataclasses.fields(group_class)})
              for attr, group_class in flag_groups(settings_class)}
    return settings_class(**groups, **extra)


# ------------------------------------------------------------------------------------------------- YAML
def recipe_names() -> list[str]:
    """The packaged recipes (``sdt-p-xl2``, ``sdt-h-t``, ...)."""
    folder = resources.files(__package__) / RECIPES
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _recipe_path(name: str) -> Path:
    return Path(str(resources.files(__package__) / RECIPES / f"{name}.yaml"))


def _config_value(action: argparse.Action, key: str, value: Any) -> Any:
    """A YAML value for ``action`` in the form the flag takes, or a ``ValueError`` saying why not.

    Counts must be integers (``2.7`` or ``2.0`` are refused, not rounded), switches ``true``/``false`` (a quoted
    ``"no"`` is a string, not false); numbers may be written as YAML numbers or as text; a list or mapping given
    for a flag that parses text is passed as that text (``[1, 2]`` as ``1,2``, a mapping as JSON).
    """
    if value is None:
        if action.default is not None and action.default is not _UNSET:
            raise ValueError(f"{key} cannot be null (default {action.default!r})")
        return None
    if isinstance(action, _Switch):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(value, dict):
        value = json.dumps(value)
    elif isinstance(value, list) and action.type not in (int, float):
        value = ",".join(str(v) for v in value)
    if action.type in (int, float):
        ok = (int, str) if action.type is int else (int, float, str)
        if isinstance(value, bool) or not isinstance(value, ok):
            what = "an integer" if action.type is int else "a number"
            raise ValueError(f"{key} must be {what}, got {value!r} ({type(value).__name__})")
        value = action.type(value)
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
    elif action.type is str and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{key} must be one of {list(action.choices)}, got {value!r}")
    return value if action.type in (int, float, str, None) else str(value)  # parsed like the flag's text


def load_yaml_config(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A YAML file as ``{dest: value}`` for ``parser``; keys may use dashes or underscores; each value goes
    through its flag's type and choices.  ``path`` may name a packaged recipe (``sdt-p-xl2``).

    Raises:
        ConfigError: the file is missing, is not a mapping, has keys that are not flags, or values of the wrong
            type.
    """
    path = Path(path)
    if not path.is_file() and str(path) in recipe_names():
        path = _recipe_path(str(path))
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file (nor a packaged recipe: {', '.join(recipe_names())})")
    try:
        data = load_yaml(path) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: invalid YAML: {e}") from None
    except ValueError as e:  # too large to be a config
        raise ConfigError(f"--config {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions
               if a.dest not in ("help", "config") and not getattr(a, "new_flag", None)}
    names = dict(actions)  # a key may also be a flag's name (aa for --aa; an old spelling warns)
    for action in parser._actions:
        if action.dest in actions and action.option_strings:
            names.setdefault(action.option_strings[0].lstrip("-").replace("-", "_"), action)
    unknown = sorted(str(k) for k in data if str(k).replace("-", "_") not in names)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; valid keys: {sorted(actions)}")
    out = {}
    for key, value in data.items():
        action = names[str(key).replace("-", "_")]
        if getattr(action, "new_flag", None):  # a deprecated spelling (utils.cli_args.add_deprecated_alias)
            print(f"warning: {key} in {path} is deprecated and will be removed in the next release; use "
                  f"{action.new_flag.lstrip('-').replace('-', '_')}", file=sys.stderr)
            action = actions[action.dest]
        try:
            out[action.dest] = _config_value(action, str(key), value)
        except ValueError as e:
            raise ConfigError(f"--config {path}: {e}") from None
    return out


def parse_flags(parser: FlagParser, argv: Sequence[str] | None) -> FlagNamespace:
    """Parse ``argv`` with ``--config`` values as defaults that command-line flags override; the result's
    ``sources`` say where each value came from."""
    first = argparse.ArgumentParser(add_help=False)  # --config alone: the other flags are parsed once, below
    first.add_argument("--config", default=None)
    pre, _ = first.parse_known_args(argv)
    if pre.config:
        parser.set_yaml_defaults(load_yaml_config(pre.config, parser), f"--config {pre.config}")
    return parser.parse_args(argv)


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and paths as text (for ``train_config.yaml`` and the trackers)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def flag_table(parser: argparse.ArgumentParser) -> str:
    """A command's flags as a Markdown table (flag, default, meaning), one row per flag in ``--help`` order;
    ``docs/training.md`` and ``docs/training_sdt_h.md`` hold these tables, and a test keeps them equal."""
    rows = ["| flag | default | |", "|---|---|---|"]
    for group in parser._action_groups:
        for action in group._group_actions:
            if action.dest == "help" or action.help == argparse.SUPPRESS:
                continue
            default = action.default
            shown = ("on" if default else "off") if isinstance(action, _Switch) else (
                "" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else str(default))
            names = ", ".join(f"`{o}`" for o in action.option_strings)
            rows.append(f"| {names} | {shown} | {(action.help or '').replace('|', '/')} |")
    return "\n".join(rows) + "\n"
