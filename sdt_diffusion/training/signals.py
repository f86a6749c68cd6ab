"""Stopping a run cleanly: SIGTERM/SIGINT become a flag the trainer checks at the end of each step."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = ["StopSignal"]


class StopSignal:
    """Within the ``with`` block SIGTERM/SIGINT set :attr:`signum` (a second SIGINT aborts at once).

    The handlers are installed only in the main thread (Python delivers signals there) and restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"[train] received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, exiting",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
