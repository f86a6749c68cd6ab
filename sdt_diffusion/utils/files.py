"""Crash-safe file writes: a finished file or folder is either the old one or the new one, never half of each."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_text", "check_writable", "fsync_dir", "private_sibling", "replace_dir",
           "sha256_file"]


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` through ``write(binary_file)`` into a temporary file beside it, fsync, then rename.

    Readers see the old content or the new, never a partial file; a crash leaves at most a hidden
    ``.<name>.<pid>.tmp`` file, which nothing reads.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def private_sibling(target: str | Path, suffix: str) -> Path:
    """A hidden name beside ``target`` that no other process or user holds: ``.<name>.<pid>.<token>.<suffix>``
    (the token is random), for a temporary file or folder that only this call may create and remove."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}")


def replace_dir(tmp: str | Path, target: str | Path) -> Path:
    """Move the finished folder ``tmp`` to ``target``, replacing an existing ``target`` safely.

    The old ``target`` is first renamed to a :func:`private_sibling` and deleted only once the new one is in
    place, so a crash at any point leaves either folder complete under one of the two names.  Nothing else
    beside ``target`` is touched (a user's ``<target>.old`` stays).
    """
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        old = private_sibling(target, "old")
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)
    return target


def check_writable(path: str | Path) -> Path:
    """Check, before any expensive work, that a file can be written at ``path``: its folder is created if
    missing and a probe file is created in it and removed; returns ``path``.

    Raises:
        OSError: naming ``path`` (a folder there, a file in the way of its folder, no permission, read-only or
            full file system).
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder")
        blocking = next((p for p in path.parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise NotADirectoryError(f"{blocking} is a file, not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
        probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
        with open(probe, "xb") as f:
            f.write(b"\0")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
