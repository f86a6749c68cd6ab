"""One command-line vocabulary for every sdt-diffusion command.

The same concept has the same flag everywhere:

* ``--guidance-scale`` (classifier-free guidance scale);
* ``--output`` names a file, ``--output-dir`` a folder;
* ``--dtype {float32,float16,bfloat16}``;
* classes by id or by name (:func:`class_arg`, resolved against a model's ``id2label``).

Old spellings keep working for one release: :func:`add_deprecated_alias` registers them hidden from
``--help``, and using one prints a one-line deprecation warning naming the new flag.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "DTYPE_ALIASES",
    "DTYPE_CHOICES",
    "add_deprecated_alias",
    "add_dtype_argument",
    "class_arg",
    "dtype_name",
    "torch_dtype",
    "warn_deprecated",
]

DTYPE_CHOICES = ("float32", "float16", "bfloat16")
# Old short spellings (kept for one release, with a deprecation warning).
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SDTDeprecationWarning(FutureWarning):
    """An old flag or value spelling that still works for one release (FutureWarning: shown by default)."""


def warn_deprecated(old: str, new: str) -> None:
    """Print one line: ``old`` is deprecated, use ``new`` (once per spelling and process)."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}",
                  SDTDeprecationWarning, stacklevel=3)


def _format_warning(message, category, filename, lineno, line=None) -> str:  # one line, no source echo
    return f"warning: {message}\n"


def _show(message: warnings.WarningMessage) -> None:
    sys.stderr.write(_format_warning(message.message, message.category, message.filename, message.lineno))


class _DeprecatedFlag(argparse.Action):
    """Store into the new flag's destination and warn that ``option_string`` is the old spelling."""

    def __init__(self, option_strings: Sequence[str], dest: str, new_flag: str = "", **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SDTDeprecationWarning)
            warn_deprecated(option_string or self.option_strings[0], self.new_flag)
        for message in caught:
            _show(message)
        if self.nargs == 0:
            values = self.const
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Accept ``old`` (hidden from ``--help``) as a deprecated spelling of the flag ``new``.

    ``kwargs`` are those of the new flag that parsing needs (``type``, ``nargs``, ``choices``; for a switch
    ``nargs=0, const=True``). The value lands in the new flag's destination.
    """
    action = next((a for a in parser._actions if new in a.option_strings), None)
    if action is None:
        raise ValueError(f"add_deprecated_alias: the parser has no flag {new} (add it before its alias)")
    kwargs.setdefault("type", action.type)
    if action.nargs == 0:  # a switch
        kwargs.setdefault("nargs", 0)
        kwargs.setdefault("const", action.const)
        kwargs.pop("type", None)
    elif action.nargs is not None:
        kwargs.setdefault("nargs", action.nargs)
    if action.choices is not None and "choices" not in kwargs and action.nargs != 0:
        kwargs["choices"] = action.choices
    parser.add_argument(old, dest=action.dest, action=_DeprecatedFlag, new_flag=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def dtype_name(text: str) -> str:
    """``--dtype`` parser: one of :data:`DTYPE_CHOICES`; an old short spelling warns and is mapped."""
    value = str(text).strip().lower()
    if value in DTYPE_ALIASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SDTDeprecationWarning)
            warn_deprecated(f"--dtype {value}", f"--dtype {DTYPE_ALIASES[value]}")
        for message in caught:
            _show(message)
        return DTYPE_ALIASES[value]
    if value not in DTYPE_CHOICES:
        raise argparse.ArgumentTypeError(f"invalid dtype {text!r}: choose from {', '.join(DTYPE_CHOICES)}")
    return value


def add_dtype_argument(parser: argparse.ArgumentParser, default: str = "float32", help: str = "dtype") -> None:
    """``--dtype {float32,float16,bfloat16}`` (old ``fp32``/``fp16``/``bf16`` accepted with a warning)."""
    if default not in DTYPE_CHOICES:
        raise ValueError(f"default dtype must be one of {DTYPE_CHOICES}, got {default!r}")
    parser.add_argument("--dtype", type=dtype_name, default=default, metavar="{" + ",".join(DTYPE_CHOICES) + "}",
                        help=f"{help} (default {default})")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` value (old short spellings accepted)."""
    name = DTYPE_ALIASES.get(name, name)
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"invalid dtype {name!r}: choose from {', '.join(DTYPE_CHOICES)}") from None


def class_arg(text: str) -> int | str:
    """A class given on the command line: an id (``"207"``) or a name (``"golden retriever"``).

    Names are resolved against the model's ``id2label`` by the command (``LabelIndex``); an id outside the
    model's classes is refused there, by value.
    """
    text = str(text).strip()
    if not text:
        raise argparse.ArgumentTypeError("empty class: give a class id or a class name")
    return int(text) if text.lstrip("-").isdigit() else text
