"""Atomic, verifiable, code-free checkpoints: ``<output-dir>/checkpoint-<step>`` written through ``checkpoint-<step>.tmp``.

Layout of a checkpoint (every file in a format that cannot carry code, see :mod:`.state_files`):

* ``model.safetensors``, ``optimizer.safetensors`` (AdamW tensors + JSON hyper-parameters), ``ema.safetensors``
  (written by the main process; under DDP every process holds the same values);
* ``rng_state_rank<r>.safetensors``: each process's torch CPU/CUDA, numpy and Python generator states;
* ``grad_scaler.json`` with fp16 mixed precision;
* under FSDP instead of the first three: accelerate's sharded model and optimizer folders
  (``torch.distributed.checkpoint``) and one ``ema_shard_rank<r>.safetensors`` per process;
* ``training_state.json``, written last: the step, the batch layout, the data position, the data stream's
  fingerprint (``data_stream``), the lineage (``trajectory`` and ``parent``), the model config, the resolved VAE,
  and a manifest (size and sha256) of every other file.  It is the completeness marker: after a
  barrier the main process writes it and renames the folder to ``checkpoint-<step>``.  A crash mid-save
  leaves only a ``.tmp`` folder, which is never resumed from and is cleaned up by a later save.

On resume every file is checked against the manifest before it is read, so a truncated, bit-flipped or swapped
file stops the run with the file named and the previous checkpoint suggested.  Nothing is unpickled, except
that under FSDP ``torch.distributed.checkpoint`` reads its own ``.metadata`` files with ``pickle`` (checked
against the manifest first; see ``docs/training.md``).

The run's end is recorded separately: ``<output-dir>/training_done.json`` is written after the final export,
and only it (not the step count) says that a run is finished.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
from safetensors import safe_open

from ..utils.files import atomic_write_text, replace_dir, sha256_file
from .config import ConfigError
from .ema import EMA
from .state_files import (
    RngState,
    StateFileError,
    capture_rng,
    load_ema_file,
    load_model_file,
    load_optimizer_file,
    load_scaler_file,
    read_rng_file,
    save_ema_file,
    save_model_file,
    save_optimizer_file,
    save_rng_file,
    save_scaler_file,
)

__all__ = [
    "ABANDONED_DIR",
    "CHECKPOINT_FORMAT",
    "DONE_FILE",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointWriteError",
    "TrainingObjects",
    "check_checkpoint",
    "checkpoint_step",
    "clear_done",
    "damaged",
    "latest_checkpoint",
    "list_checkpoints",
    "load_state",
    "newer_step_outputs",
    "prune_checkpoints",
    "read_done",
    "read_ema_shadow",
    "read_ema_shapes",
    "read_rng_states",
    "read_training_state",
    "resolve_resume",
    "rng_file",
    "save_checkpoint",
    "set_aside_newer",
    "verify_file",
    "write_done",
    "write_state",
]

STATE_FILE = "training_state.json"
DONE_FILE = "training_done.json"
ABANDONED_DIR = "abandoned"  # checkpoints of a trajectory a resume from an older checkpoint left behind
CHECKPOINT_FORMAT = "sdt-diffusion-checkpoint"
CHECKPOINT_VERSION = 2
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EMA_FILE = "ema.safetensors"
SCALER_FILE = "grad_scaler.json"
# accelerate's pickled state files, written by earlier versions of this trainer: never read for a resume
LEGACY_PICKLES = ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl")
LEGACY_EMA_FILE = "custom_checkpoint_0.pkl"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_RNG_NAME = re.compile(r"^rng_state_rank\d+\.safetensors$")
_EMA_SHARD_NAME = re.compile(r"^ema_shard_rank\d+\.safetensors$")


class TrainingObjects(Protocol):
    """What a checkpoint saves and restores: the prepared model and optimizer, the EMA, and whether FSDP shards
    them (e.g. :class:`~.step.TrainingCore`)."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    fsdp: bool


class CheckpointError(ConfigError):
    """A checkpoint file is missing, truncated, altered or unreadable; the message names it and the checkpoint to
    fall back to."""


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the file and the previous
    checkpoint, which is intact.  Reported like bad input: one line, no traceback."""


def rng_file(rank: int) -> str:
    """The name of process ``rank``'s RNG state file."""
    return f"rng_state_rank{rank:05d}.safetensors"


def _ema_shard_file(rank: int) -> str:
    return f"ema_shard_rank{rank:05d}.safetensors"


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


def _fallback_advice(checkpoint: Path) -> str:
    """What to do about a damaged checkpoint: the previous complete one, if there is any."""
    step = checkpoint_step(checkpoint)
    older = [p for s, p in list_checkpoints(checkpoint.parent) if step is not None and s < step]
    if older:
        return (f"the checkpoint {checkpoint} is damaged: resume from the previous one with --resume {older[-1]} "
                f"(or delete {checkpoint.name} and pass --resume latest)")
    return f"the checkpoint {checkpoint} is damaged and there is no earlier checkpoint in {checkpoint.parent}"


def damaged(checkpoint: str | Path, file: str | Path, problem: str) -> CheckpointError:
    """A :class:`CheckpointError` naming ``file`` of ``checkpoint`` and the checkpoint to fall back to."""
    checkpoint = Path(checkpoint)
    return CheckpointError(f"{Path(file)}: {problem}; {_fallback_advice(checkpoint)}")


def read_training_state(path: str | Path) -> dict[str, Any]:
    """``training_state.json`` of a checkpoint (plain JSON).

    Raises:
        ConfigError: the folder is not a complete checkpoint.
        CheckpointError: the file is not a JSON object.
    """
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise ConfigError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(path, f, f"not a JSON file ({e})") from None
    if not isinstance(state, dict):
        raise damaged(path, f, f"expected a JSON object, got {type(state).__name__}")
    return state


def check_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Check that ``path`` is a checkpoint of this format whose files are all present with their recorded sizes
    (cheap: no file is read).  The RNG state files are left to :func:`read_rng_states`: a missing one makes the
    resume inexact rather than impossible.

    Raises:
        ConfigError: a checkpoint of an earlier version (accelerate's pickled state), or no manifest.
        CheckpointError: a missing or truncated file.
    """
    path = Path(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        pickles = [n for n in LEGACY_PICKLES if (path / n).exists()]
        if pickles:
            raise ConfigError(
                f"{path} was written by an earlier version of the trainer, which stored state in accelerate's "
                f"pickle files ({', '.join(pickles)}); they are not loaded, because unpickling a file can run "
                f"code. Export its EMA weights with `sdt-export {path} --output-dir DIR` (read without unpickling "
                f"code) or start a new run"
            )
        raise damaged(path, path / STATE_FILE, f"not an {CHECKPOINT_FORMAT} state (no 'format' field)")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path}: checkpoint format version {state.get('format_version')}, this code reads "
                          f"{CHECKPOINT_VERSION}")
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        raise damaged(path, path / STATE_FILE, "no file manifest")
    for name, entry in sorted(files.items()):
        f = path / name
        if _RNG_NAME.match(name):
            continue
        if not f.is_file():
            raise damaged(path, f, "missing")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise damaged(path, f, f"{size} bytes, the checkpoint wrote {entry.get('bytes')} (truncated or replaced)")


def _file_problem(checkpoint: Path, state: dict[str, Any], name: str) -> str | None:
    """Why ``name`` of ``checkpoint`` does not match the manifest (``None`` when it does)."""
    f = checkpoint / name
    entry = (state.get("files") or {}).get(name)
    if entry is None:
        return f"not listed in {STATE_FILE}"
    if not f.is_file():
        return "missing"
    if f.stat().st_size != entry.get("bytes"):
        return f"{f.stat().st_size} bytes, the checkpoint wrote {entry.get('bytes')} (truncated or replaced)"
    if sha256_file(f) != entry.get("sha256"):
        return "its content differs from what the checkpoint wrote (sha256 mismatch)"
    return None


def verify_file(checkpoint: str | Path, state: dict[str, Any], name: str) -> Path:
    """The path of ``name`` in ``checkpoint`` after checking its size and sha256 against the manifest.

    Raises:
        CheckpointError: not in the manifest, missing, or different from what was written.
    """
    checkpoint = Path(checkpoint)
    problem = _file_problem(checkpoint, state, name)
    if problem is not None:
        raise damaged(checkpoint, checkpoint / name, problem)
    return checkpoint / name


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


# --------------------------------------------------------------------------------------------- writing
def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file below ``folder`` (flushed to disk first), by relative path."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        files[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return files


def write_state(core: TrainingObjects, folder: Path) -> None:
    """Write this process's part of the training state into ``folder`` (every process calls it).

    Every process writes its RNG states; the main process the model, AdamW and the EMA (identical on every
    process under DDP); under FSDP every process its shards of them through accelerate.
    """
    accelerator = core.accelerator
    rank = accelerator.process_index
    save_rng_file(capture_rng(), folder / rng_file(rank))
    if core.fsdp:
        plugin = accelerator.state.fsdp_plugin
        save_fsdp_model(plugin, accelerator, core.model, str(folder))
        save_fsdp_optimizer(plugin, accelerator, core.optimizer, core.model, str(folder))
        save_ema_file(core.ema, folder / _ema_shard_file(rank))
    elif accelerator.is_main_process:
        save_model_file(accelerator.unwrap_model(core.model, keep_torch_compile=False), folder / MODEL_FILE)
        save_optimizer_file(core.optimizer, folder / OPTIMIZER_FILE)
        save_ema_file(core.ema, folder / EMA_FILE)
    if accelerator.scaler is not None and accelerator.is_main_process:
        save_scaler_file(accelerator.scaler, folder / SCALER_FILE)


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict[str, Any],
                    write_files: Callable[[Path], None]) -> Path:
    """Save ``output_dir/checkpoint-<step>`` atomically; all processes must call it.

    Args:
        accelerator: the run's ``Accelerator`` (barriers, main process).
        output_dir: run folder.
        step: optimizer steps done.
        state: JSON-serialisable training state; written last with the manifest, as the completeness marker.
        write_files: ``write_files(tmp_dir)``, run by every process (e.g. :func:`write_state`).

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
    try:
        write_files(tmp)
        accelerator.wait_for_everyone()  # every rank has written its files
        if accelerator.is_main_process:
            record = {**state, "step": step, "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                      "files": _manifest(tmp)}
            atomic_write_text(tmp / STATE_FILE, json.dumps(record, indent=2))
            replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) swaps, then drops the old copy
    except OSError as e:
        raise _write_failed(root, tmp, final, e) from None
    accelerator.wait_for_everyone()
    return final


def _write_failed(root: Path, tmp: Path, final: Path, error: OSError) -> CheckpointWriteError:
    """The error for a checkpoint save that failed with ``error``: the half-written ``tmp`` folder (never read) is
    removed to give the space back, and the message names the file and the checkpoint to resume from."""
    shutil.rmtree(tmp, ignore_errors=True)
    file = error.filename or tmp
    why = ("the disk is full" if error.errno == errno.ENOSPC
           else f"{error.strerror or error} ({type(error).__name__})")
    previous = latest_checkpoint(root)
    if previous is not None:
        after = (f"the previous checkpoint {previous} is intact: free space, then resume exactly with "
                 f"--resume latest")
    else:
        after = "no earlier checkpoint exists in this run"
    return CheckpointWriteError(f"cannot write checkpoint {final.name}: {file}: {why}; {after}")


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


_STEP_OUTPUT = re.compile(r"step-(\d+)(?:\.[A-Za-z0-9]+)?")  # a step's output: samples/step-0000400.png, fid/step-0000400


def newer_step_outputs(output_dir: str | Path, step: int, step_dirs: tuple[str, ...]) -> list[Path]:
    """The entries ``<output_dir>/<d>/step-<n>[.<ext>]`` with ``n > step``, for every ``d`` in ``step_dirs``."""
    found = []
    for d in step_dirs:
        folder = Path(output_dir) / d
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir()
                            if (m := _STEP_OUTPUT.fullmatch(p.name)) is not None and int(m.group(1)) > step)
    return found


def set_aside_newer(output_dir: str | Path, step: int,
                    step_dirs: tuple[str, ...] = ()) -> tuple[Path | None, list[Path], list[Path]]:
    """Move every complete checkpoint of ``output_dir`` newer than ``step``, and every step output newer than
    ``step`` in the folders ``step_dirs`` (a task's sample grids and FID results, :func:`newer_step_outputs`), into
    ``<output_dir>/abandoned/<YYYYmmdd-HHMMSS>-from-<step>/`` (a rename each, nothing copied or deleted; a step
    output keeps its folder: ``.../fid/step-0000400``); returns ``(that folder, the checkpoints, the step outputs
    as they were named)``, ``(None, [], [])`` when no checkpoint is newer (then the run continues the newest
    checkpoint's trajectory, and its newer outputs are remade as they were).  Main process only.

    A resume from an older checkpoint starts another trajectory: left in place, the newer checkpoints of the old
    one would be what ``--resume latest`` continues after a requeue, and what pruning keeps while it deletes the
    new trajectory's; its newer sample grids and FID results would read as this run's until it overwrote them.
    """
    root = Path(output_dir)
    newer = [p for s, p in list_checkpoints(root) if s > step]
    if not newer:  # a resume from the newest checkpoint continues its trajectory and remakes the same outputs
        return None, [], []
    outputs = newer_step_outputs(root, step, step_dirs)
    stem = root / ABANDONED_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-from-{step}"
    folder, n = stem, 1
    while folder.exists():  # a second rollback to the same step within a second
        n += 1
        folder = stem.with_name(f"{stem.name}-{n}")
    folder.mkdir(parents=True)
    for p in newer:
        os.replace(p, folder / p.name)
    for p in outputs:
        target = folder / p.parent.relative_to(root) / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    return folder, newer, outputs


# --------------------------------------------------------------------------------------------- reading
def read_rng_states(checkpoint: str | Path, state: dict[str, Any], rank: int) -> tuple[RngState | None, str | None]:
    """Process ``rank``'s RNG states, or ``(None, why not)`` when the file is missing, altered, unreadable or
    holds another number of CUDA generators than this process sees."""
    checkpoint = Path(checkpoint)
    name = rng_file(rank)
    f = checkpoint / name
    if not f.is_file():
        return None, f"{f} is missing (the checkpoint holds the RNG states of {state.get('num_processes')} processes)"
    problem = _file_problem(checkpoint, state, name)
    if problem is not None:
        return None, f"{f} is unusable: {problem}"
    try:
        rng = read_rng_file(f)
    except StateFileError as e:
        return None, f"{f} is unusable: {e.problem}"
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(rng.torch_cuda) != devices:
        return None, (f"{f} holds {len(rng.torch_cuda)} CUDA generator states, this process sees {devices} CUDA "
                      f"devices")
    return rng, None


def _fsdp_files(state: dict[str, Any]) -> list[str]:
    """The model/optimizer files accelerate wrote for FSDP: every file of the manifest that is not one of ours."""
    ours = {MODEL_FILE, OPTIMIZER_FILE, EMA_FILE, SCALER_FILE}
    return [n for n in state.get("files", {}) if n not in ours and not _RNG_NAME.match(n)
            and not _EMA_SHARD_NAME.match(n)]


def load_state(core: TrainingObjects, checkpoint: str | Path, state: dict[str, Any]) -> float:
    """Restore the weights, AdamW, the EMA and the grad scaler of ``checkpoint`` (every process calls it), each
    file checked against the manifest first; returns the EMA decay the checkpoint was written with (the run keeps
    its own).  The RNG states are restored by the caller.

    Raises:
        CheckpointError: a file is missing, altered, unreadable or does not fit the model.
    """
    checkpoint = Path(checkpoint)
    accelerator = core.accelerator
    try:
        if core.fsdp:
            for name in _fsdp_files(state):
                verify_file(checkpoint, state, name)
            plugin = accelerator.state.fsdp_plugin
            try:
                load_fsdp_model(plugin, accelerator, core.model, str(checkpoint))
                load_fsdp_optimizer(plugin, accelerator, core.optimizer, core.model, str(checkpoint))
            except Exception as e:  # noqa: BLE001 - torch.distributed.checkpoint errors, with the folder named
                raise StateFileError(checkpoint, f"cannot load the sharded model/optimizer ({type(e).__name__}: "
                                                 f"{e})") from None
            ema_name = _ema_shard_file(accelerator.process_index)
        else:
            model = accelerator.unwrap_model(core.model, keep_torch_compile=False)
            load_model_file(model, verify_file(checkpoint, state, MODEL_FILE))
            load_optimizer_file(core.optimizer, verify_file(checkpoint, state, OPTIMIZER_FILE))
            ema_name = EMA_FILE
        shadow, decay, num_updates = load_ema_file(verify_file(checkpoint, state, ema_name))
        try:
            core.ema.load_state_dict({"decay": core.ema.decay, "num_updates": num_updates, "shadow": shadow})
        except ValueError as e:
            raise StateFileError(checkpoint / ema_name, str(e)) from None
        if accelerator.scaler is not None:
            load_scaler_file(accelerator.scaler, verify_file(checkpoint, state, SCALER_FILE))
    except StateFileError as e:
        raise damaged(checkpoint, e.path, e.problem) from None
    return decay


def read_ema_shapes(checkpoint: str | Path) -> list[tuple[int, ...]] | None:
    """The shapes of the EMA tensors of a (non-FSDP) checkpoint, in parameter order, read from the safetensors header
    of ``ema.safetensors`` alone (no tensor is loaded); ``None`` for a checkpoint without that file (an earlier
    version's or an FSDP one: :func:`read_ema_shadow` says why).

    Raises:
        CheckpointError: the file is not a safetensors file of EMA tensors ``"0"`` .. ``"<n-1>"``.
    """
    checkpoint = Path(checkpoint)
    f = checkpoint / EMA_FILE
    if not f.is_file():
        return None
    try:
        with safe_open(str(f), framework="pt", device="cpu") as reader:
            shapes = {k: tuple(reader.get_slice(k).get_shape()) for k in reader.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError, re-raised with the file named
        raise damaged(checkpoint, f, f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    if sorted(shapes) != sorted(str(i) for i in range(len(shapes))):
        raise damaged(checkpoint, f, "not an EMA file (its tensors are not named 0 .. n-1)")
    return [shapes[str(i)] for i in range(len(shapes))]


def read_ema_shadow(checkpoint: str | Path) -> list[torch.Tensor]:
    """The EMA weights of a (non-FSDP) checkpoint, in the model's ``parameters()`` order, on the CPU.

    ``ema.safetensors`` is checked against the manifest.  A checkpoint of an earlier version keeps the EMA in
    accelerate's ``custom_checkpoint_0.pkl``, read with ``torch.load(weights_only=True)`` (tensors and plain
    containers only, no code).

    Raises:
        FileNotFoundError: no EMA file (an FSDP checkpoint keeps the EMA sharded per process).
        CheckpointError: the EMA file is damaged.
        ValueError: the file does not hold an EMA state.
    """
    checkpoint = Path(checkpoint)
    state = read_training_state(checkpoint)
    if state.get("format") == CHECKPOINT_FORMAT:
        if _fsdp_files(state):
            raise FileNotFoundError(f"{checkpoint} has no {EMA_FILE}: an FSDP checkpoint keeps the EMA in "
                                    f"per-process shards; use the pipeline the run exported (at the end and every "
                                    f"--export-every steps)")
        try:
            return load_ema_file(verify_file(checkpoint, state, EMA_FILE))[0]
        except StateFileError as e:
            raise damaged(checkpoint, e.path, e.problem) from None
    legacy = checkpoint / LEGACY_EMA_FILE
    if not legacy.is_file():
        sharded = any(checkpoint.glob("ema_shard_rank*.safetensors"))
        why = ("an FSDP checkpoint keeps the EMA in per-process shards; use the pipeline the run exported "
               "(at the end and every --export-every steps)") if sharded else "incomplete or foreign checkpoint"
        raise FileNotFoundError(f"{checkpoint} has no EMA state ({EMA_FILE} or {LEGACY_EMA_FILE}): {why}")
    try:
        legacy_state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError (refused globals) and truncation, with the file named
        raise ValueError(f"{legacy}: not an EMA state readable without running code ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    shadow = legacy_state.get("shadow") if isinstance(legacy_state, dict) else None
    if not isinstance(shadow, list) or not all(isinstance(t, torch.Tensor) for t in shadow):
        raise ValueError(f"{legacy} does not hold an EMA state (a dict with a list of tensors under 'shadow')")
    return shadow


# ------------------------------------------------------------------------------------------ end of run
def read_done(output_dir: str | Path) -> dict[str, Any] | None:
    """The ``training_done.json`` of a finished run (``None`` if there is none or it is unreadable)."""
    f = Path(output_dir) / DONE_FILE
    try:
        done = json.loads(f.read_bytes())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and isinstance(done.get("step"), int) else None


def write_done(output_dir: str | Path, step: int, pipeline: Path | None) -> None:
    """Record that the run finished at ``step``: final held-out loss, checkpoint and export all written."""
    atomic_write_text(Path(output_dir) / DONE_FILE,
                      json.dumps({"step": step, "pipeline": str(pipeline) if pipeline else None}, indent=2))


def clear_done(output_dir: str | Path) -> None:
    """Remove the end-of-run record (the run continues past it)."""
    (Path(output_dir) / DONE_FILE).unlink(missing_ok=True)
