"""The data-stream fingerprint: what, besides the seed and the batch layout, decides the batches a run sees.

Each task names the parts of its stream (:meth:`~.engine.Task.stream_fingerprint`): the training data (a digest of
its file list and sizes, a ``datasets`` dataset's fingerprint or a latent cache's metadata and shard sizes, see
:meth:`~sdt_diffusion.data.LabelledImages.fingerprint`), the class names, and every setting of the transform
(resolution, flips, augmentation).  Every checkpoint stores them (``data_stream`` in ``training_state.json``); a
resume compares them part by part with :func:`stream_changes` and each difference becomes a named reason of
:func:`~.engine.check_exactness` (refused, or accepted with ``--allow-inexact-resume`` and recorded).  The seed and
the batch layout are recorded beside it (``seed``, ``num_processes``, ``per_device_batch``, ``grad_accum``) and
checked there.
"""

from __future__ import annotations

import json
from typing import Any

from .flags import plain

__all__ = ["DATA", "class_key", "normalise", "stream_changes"]

DATA = "training data"  # the component holding LabelledImages/LatentCacheDataset.fingerprint()


def class_key(data_fingerprint: dict[str, Any]) -> str:
    """The name of the class-name component: class folders for an image folder, else class names."""
    return "class folders" if data_fingerprint.get("source") == "image folder" else "class names"


def normalise(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """``fingerprint`` as it reads back from JSON (tuples become lists), so a fresh one compares equal to a saved
    one."""
    return json.loads(json.dumps(plain(fingerprint)))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _shown(names: list[Any], limit: int = 5) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit
                                                         else "")


def _describe_data(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A training-data change: another kind of source, files added or removed, or the same count otherwise
    changed."""
    if old.get("source") != new.get("source"):
        return f"{DATA} changed: {old.get('source')} -> {new.get('source')}"
    unit = "file" if new.get("source") == "image folder" else "sample"
    before, now = old.get("count"), new.get("count")
    if before != now and isinstance(before, int) and isinstance(now, int):
        verb = "added" if now > before else "removed"
        return f"{DATA} changed: {_plural(abs(now - before), unit)} {verb} ({before} -> {now})"
    if unit == "file":
        return (f"{DATA} changed: the same number of files ({now}), but files were renamed, replaced (another size) "
                f"or moved to another class")
    return f"{DATA} changed: the same number of samples ({now}), but another {new.get('source')} content"


def _describe_classes(key: str, old: Any, new: Any) -> str:
    """A change of the class names: renamed (the same count), added or removed, or reordered."""
    if not isinstance(old, list) or not isinstance(new, list):
        return f"{key} changed: {old!r} -> {new!r}"
    gone = [n for n in old if n not in new]
    came = [n for n in new if n not in old]
    if not gone and not came:
        return f"{key} reordered (class ids follow the order): {_shown(old)} -> {_shown(new)}"
    if len(old) == len(new):
        pairs = [f"{a!r} -> {b!r}" for a, b in zip(gone, came)]
        shifted = [a for a, b in zip(old, new) if a != b and a not in gone]
        ids = f" (the ids of {_shown(shifted)} shift with the sorted names)" if shifted else ""
        return f"{key} renamed: {', '.join(pairs[:5])}{' ...' if len(pairs) > 5 else ''}{ids}"
    parts = ([f"added {_shown(came)}"] if came else []) + ([f"removed {_shown(gone)}"] if gone else [])
    return f"{key} changed ({len(old)} -> {len(new)} classes): {', '.join(parts)}"


def _describe(key: str, old: Any, new: Any) -> str:
    if key == DATA and isinstance(old, dict) and isinstance(new, dict):
        return _describe_data(old, new)
    if key in ("class folders", "class names"):
        return _describe_classes(key, old, new)
    return f"{key} changed: {old!r} -> {new!r}"


def stream_changes(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(reasons, unchecked)``: one reason per component that differs between a checkpoint's fingerprint and the
    run's, and the components only one of them holds (written by another version: they cannot be compared)."""
    reasons, unchecked = [], []
    for key in list(now) + [k for k in saved if k not in now]:
        if key not in saved or key not in now:
            unchecked.append(key)
        elif saved[key] != now[key]:
            reasons.append(_describe(key, saved[key], now[key]))
    return reasons, unchecked
