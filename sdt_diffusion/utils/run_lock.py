"""An exclusive lock on a run's output for the life of the run, so two runs never write the same folder.

The lock is ``fcntl.flock`` on a small file (``<output-dir>/.sdt-lock`` for the trainers) holding JSON
``{pid, host, started, command}`` of its holder.  The kernel releases a flock when its process dies, so a crash
never leaves a live lock: a lock file whose flock is free but which still names a holder is stale (its process
ended without releasing it) and is taken over with a log line.  In a multi-process run only the main process
takes it (POSIX only: ``fcntl``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import ConfigError

__all__ = ["LOCK_FILE", "OutputLockedError", "RunLock", "lock_run"]

LOCK_FILE = ".sdt-lock"

logger = logging.getLogger("sdt_diffusion")


class OutputLockedError(ConfigError):
    """Another live run holds the lock (exit code 2 in every command, like any bad input)."""


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        holder = json.loads(text) if text.strip() else None
    except ValueError:
        return {"pid": "?", "host": "?", "note": "unreadable lock record"}
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown process"
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')})")


class RunLock:
    """``with RunLock(path, what="--output-dir X"):`` holds an exclusive lock on ``path`` or refuses at once.

    Args:
        path: the lock file (its folder is created if missing).
        what: how the locked output is named in messages (e.g. ``"--output-dir runs/a"``).
        enabled: ``False`` makes it a no-op (the non-main processes of a multi-process run).

    Raises:
        OutputLockedError: on entry, when a live process holds the lock (naming its PID and host).
    """

    def __init__(self, path: str | Path, what: str | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self.enabled = enabled
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (see the class); a stale record of a dead holder is logged and replaced."""
        if not self.enabled or self._fd is not None:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(f"{self.what} is in use by another run: {_describe(_read_holder(self.path))}; "
                                    f"wait for it to end or choose another output (lock file {self.path})") from None
        except BaseException:
            os.close(fd)
            raise
        stale = _read_holder(self.path)
        if stale:
            logger.warning("%s: taking over the stale lock of %s, which ended without releasing it", self.what,
                           _describe(stale))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the record (a clean end leaves no stale holder) and drop the lock; the file stays, so a
        waiting run never locks an unlinked file."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def lock_run(path: str | Path, what: str, *, is_main: bool, num_processes: int) -> RunLock:
    """A held :class:`RunLock` on ``path``, taken by the main process only; in a multi-process run every process
    learns the outcome (accelerate's ``gather_object``), so all of them stop alike when it is taken.

    Raises:
        OutputLockedError: another live run holds it (its PID and host named).
        ConfigError: the lock file cannot be created (naming ``what`` and the reason).
    """
    lock = RunLock(path, what, enabled=is_main)
    error: tuple[bool, str] | None = None
    try:
        lock.acquire()
    except OutputLockedError as e:
        error = (True, str(e))
    except OSError as e:
        error = (False, f"{what}: cannot create the lock file {path}: {e}")
    if num_processes > 1:
        from accelerate.utils import gather_object

        errors = gather_object([error])
    else:
        errors = [error]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        lock.release()
        raise (OutputLockedError if first[0] else ConfigError)(first[1])
    return lock
