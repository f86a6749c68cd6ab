"""Atomic, resumable checkpoints: ``<output-dir>/checkpoint-<step>`` written through ``checkpoint-<step>.tmp``.

Saving: every process calls ``accelerator.save_state`` into ``checkpoint-<step>.tmp`` (model weights,
optimizer, grad scaler, every process's RNG states, registered objects such as the EMA); after a barrier the
main process writes ``training_state.json`` (the completeness marker) and renames the folder to
``checkpoint-<step>``.  A crash mid-save leaves only a ``.tmp`` folder, which is never resumed from and is
cleaned up by the next save of that step.  Only folders named exactly ``checkpoint-<int>`` that contain
``training_state.json`` count as checkpoints.

The EMA is accelerate's first registered object (``custom_checkpoint_0.pkl``, read back here with
``weights_only=True``) or, under FSDP, one ``ema_shard_rank<r>.safetensors`` per process.  This module is
the only place that knows these file names: everything else (the trainer's resume, the checkpoint export)
goes through :func:`read_ema_shadow`, :func:`save_ema_shard` and :func:`load_ema_shard`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..utils.files import replace_dir
from .config import ConfigError
from .ema import EMA

__all__ = [
    "STATE_FILE",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_ema_shard",
    "prune_checkpoints",
    "read_ema_shadow",
    "read_training_state",
    "resolve_resume",
    "save_checkpoint",
    "save_ema_shard",
]

STATE_FILE = "training_state.json"
EMA_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first object registered for checkpointing
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else ``None``."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in ``output_dir``, oldest first (``.tmp`` folders ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((step, p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or ``None``."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_training_state(path: str | Path) -> dict[str, Any]:
    """``training_state.json`` of a checkpoint.

    Raises:
        ConfigError: the folder is not a complete checkpoint.
    """
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise ConfigError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return json.loads(f.read_text())


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``None``, ``"latest"`` (must exist), ``"auto"`` (latest if any) or a path.

    Without ``--resume``, an output folder that already holds checkpoints is an error (it would mix two
    runs).

    Raises:
        ConfigError: ``latest`` with no checkpoint, a path that is not a complete checkpoint, or a fresh
            run into a folder with checkpoints.
    """
    if resume is None:
        existing = latest_checkpoint(output_dir)
        if existing is not None:
            raise ConfigError(
                f"--output-dir {output_dir} already holds checkpoints (newest: {existing.name}); pass --resume latest "
                f"to continue that run, or choose another --output-dir"
            )
        return None
    if resume in ("latest", "auto"):
        path = latest_checkpoint(output_dir)
        if path is None and resume == "latest":
            raise ConfigError(f"--resume latest: no complete checkpoint-<step> folder in {output_dir}")
        return path
    path = Path(resume)
    read_training_state(path)
    return path


def _ema_shard_file(folder: Path, rank: int) -> Path:
    return folder / f"ema_shard_rank{rank:05d}.safetensors"


def save_ema_shard(ema: EMA, folder: str | Path, rank: int) -> None:
    """FSDP: write this process's shard of the EMA into ``folder`` (every process calls it)."""
    save_file({str(i): s.contiguous().cpu() for i, s in enumerate(ema.shadow)}, str(_ema_shard_file(Path(folder), rank)))


def load_ema_shard(ema: EMA, checkpoint: str | Path, rank: int, num_updates: int) -> None:
    """FSDP: restore this process's shard of the EMA from ``checkpoint``."""
    shard = load_file(str(_ema_shard_file(Path(checkpoint), rank)))
    ema.load_state_dict({"decay": ema.decay, "num_updates": num_updates,
                         "shadow": [shard[str(i)] for i in range(len(ema.shadow))]})


def read_ema_shadow(checkpoint: str | Path) -> list[torch.Tensor]:
    """The EMA weights of a (non-FSDP) checkpoint, in the model's ``parameters()`` order, on the CPU.

    Read with ``torch.load(weights_only=True)``: tensors and plain containers only, no arbitrary unpickling.

    Raises:
        FileNotFoundError: no EMA file (an FSDP checkpoint keeps the EMA sharded per process).
        ValueError: the file does not hold an EMA state.
    """
    path = Path(checkpoint) / EMA_FILE
    if not path.is_file():
        sharded = any(Path(checkpoint).glob("ema_shard_rank*.safetensors"))
        why = ("an FSDP checkpoint keeps the EMA in per-process shards; use the pipeline the run exported "
               "(at the end and every --export-every steps)") if sharded else "incomplete or foreign checkpoint"
        raise FileNotFoundError(f"{checkpoint} has no EMA state ({EMA_FILE}): {why}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    shadow = state.get("shadow") if isinstance(state, dict) else None
    if not isinstance(shadow, list) or not all(isinstance(t, torch.Tensor) for t in shadow):
        raise ValueError(f"{path} does not hold an EMA state (a dict with a list of tensors under 'shadow')")
    return shadow


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict[str, Any],
                    extra_saver: Any | None = None) -> Path:
    """Save the full training state atomically as ``output_dir/checkpoint-<step>``; all processes must call it.

    Args:
        accelerator: the ``Accelerator`` whose prepared objects and registered objects are saved.
        output_dir: run folder.
        step: optimizer steps done.
        state: JSON-serialisable training state (written last, as the completeness marker).
        extra_saver: optional ``callable(tmp_dir)`` run by every process after ``save_state`` (per-rank files).

    Returns:
        The checkpoint folder.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if extra_saver is not None:
        extra_saver(tmp)
    accelerator.wait_for_everyone()  # every rank has written its files
    if accelerator.is_main_process:
        marker = tmp / STATE_FILE
        with open(marker, "w") as f:
            json.dump({**state, "step": step}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) swaps, then drops the old copy
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep=0`` keeps all) and leftover ``.tmp``
    folders of older steps (a crashed save); returns the deleted folders.  Main process only."""
    found = list_checkpoints(output_dir)
    newest = found[-1][0] if found else None
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in Path(output_dir).glob("checkpoint-*.tmp"):
        step = checkpoint_step(p.name[: -len(".tmp")])
        if step is not None and newest is not None and step < newest:
            doomed.append(p)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
