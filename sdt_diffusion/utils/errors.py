"""Errors every layer raises for bad user input, before any compute starts."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A bad flag, flag combination, config file or input data; raised before any compute starts.

    Commands print its message as one line (no traceback) and exit with status 2.
    """
