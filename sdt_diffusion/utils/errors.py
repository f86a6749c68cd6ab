"""Errors every layer raises for bad user input, before any compute starts, and how commands print errors."""

from __future__ import annotations

import re

__all__ = ["ConfigError", "error_line"]

_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"
_QUALIFIED_NAME = re.compile(r"[A-Za-z_][\w.]*")


class ConfigError(ValueError):
    """A bad flag, flag combination, config file or input data; raised before any compute starts.

    Commands print its message as one line (no traceback) and exit with status 2.
    """


def error_line(error: BaseException) -> str:
    """The message of ``error`` as a command prints it: one line.

    An error raised in a data-loader worker process reaches the main process re-raised by torch with the
    worker's whole traceback as its message (``Caught X in DataLoader worker process 0.`` then ``Original
    Traceback ...``); its last line, ``module.X: message``, holds the original message, which is returned.
    """
    text = str(error)
    if _WORKER_TRACEBACK not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and _QUALIFIED_NAME.fullmatch(name) else last
