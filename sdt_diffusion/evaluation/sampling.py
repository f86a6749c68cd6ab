"""Distributed, resumable sampling of ADM-format sample batches for FID-50K.

The command is ``sdt-fid-sample`` (also ``python -m sdt_diffusion.evaluation.sampling`` and the checkout script
``eval/sample.py``), run under ``accelerate launch`` for several processes.

Every sample index i is generated exactly once, from noise seeded by (seed, i) and a class label fixed
by (seed, labels mode), so the result does not depend on the number of processes.  Work is cut into
chunks of ``per_device_batch`` indices; process r takes chunks r, r+P, r+2P, ... and writes each one
atomically as ``<output>.shards/chunk-XXXXXX.npz``.  A rerun skips chunks already on disk, so a crash
or kill loses at most the chunks in flight.  The main process finally assembles ADM's layout:
``arr_0`` uint8 (N, H, W, 3) converted as ``clamp(127.5 x + 128, 0, 255)`` and ``arr_1`` the labels.

Input is always a pipeline folder (``save_pretrained``, a training run's ``pipeline/``, or a checkpoint
exported with ``sdt-export``), sampled with the scheduler saved in it unless another one is asked for.  The
pipeline is checked to decode to RGB images, and the output to be writable, before the first sample is drawn.
A run holds ``<output>.lock`` (:mod:`~..utils.run_lock`) until it ends, so a second run on the same
``--output`` (e.g. a requeued job while the first still runs) is refused with the holder's PID and host.

The shards' ``settings.json`` identifies the pipeline by a sha256 of its files (weights, VAE, scheduler and
configs), not by its path, so a pipeline re-exported between a crash and the rerun is refused instead of
mixing two models in one npz; shards without a ``settings.json`` are refused too.  A chunk that turns out to
be damaged when the npz is assembled is named and deleted, so running the same command again redoes it.
Chunks and the npz are written with fixed zip timestamps: the same command gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ..pipelines import SDTPipeline
from ..schedulers import SCHEDULER_NAMES, make_scheduler
from ..utils.cli_args import DTYPE_ALIASES, DTYPE_CHOICES, add_dtype_argument, torch_dtype
from ..utils.files import atomic_write, atomic_write_text, check_writable, sha256_file
from ..utils.run_lock import lock_run
from ..utils.runtime import MAX_PER_DEVICE_BATCH, cpu_multiprocess
from ..utils.seeding import index_generator

MAX_SEED = 2**63 - 1  # per-sample seeds are taken modulo 2**63 - 1 (utils.seeding)
# Checked before anything is allocated (with utils.runtime.MAX_PER_DEVICE_BATCH): 200 × FID-50K.
MAX_NUM_SAMPLES = 10_000_000
# The completeness marker of a training checkpoint folder (the trainer's file name; evaluation never reads the
# checkpoint, it only recognises one to point at the export command).
CHECKPOINT_MARKER = "training_state.json"


class SettingsMismatchError(ValueError):
    """The shards of an interrupted run were made with other settings than this run's."""


class DamagedChunkError(RuntimeError):
    """A finished chunk of samples turned out unreadable or inconsistent; it has been deleted, so running the same
    command again samples it anew."""


class NonFiniteSampleError(ValueError):
    """The pipeline produced NaN or infinite values; nothing of that chunk is written."""


class SettingError(ValueError):
    """A bad sampling setting: ``field`` (a :class:`SamplingSettings` field) and what is wrong with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def sample_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """Class label of every sample index: ``random`` (uniform, like DiT) or ``balanced`` (N / C each)."""
    rng = np.random.default_rng([seed, 0x5D7])
    if mode == "random":
        return rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    if mode == "balanced":
        if num_samples % num_classes:
            raise ValueError(f"balanced labels need a number of samples divisible by {num_classes} (the classes), "
                             f"got {num_samples}")
        return rng.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
    raise ValueError(f"the labels mode must be 'random' or 'balanced', got {mode!r}")


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index``: independent of batch composition and process count."""
    return index_generator(seed, index)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3) as ``clamp(127.5 x + 128, 0, 255)`` (ADM/DiT)."""
    x = (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def load_pipeline(folder: str | Path, dtype: torch.dtype = torch.float32) -> SDTPipeline:
    """The ``SDTPipeline`` saved in ``folder`` (``save_pretrained`` or the trainer's export).

    Raises:
        FileNotFoundError: no such folder, or no ``model_index.json`` in it.
        ValueError: ``folder`` is a training checkpoint (export it first), or a file in it cannot be loaded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder {folder} " + ("is a file" if folder.exists() else "does not exist"))
    if (folder / CHECKPOINT_MARKER).is_file():
        raise ValueError(
            f"{folder} is a training checkpoint, not a pipeline folder; export its EMA weights first with "
            f"`sdt-export {folder} --output-dir PIPELINE_DIR` (or `python training/export_pipeline.py ...`) and sample "
            f"from PIPELINE_DIR"
        )
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not an SDTPipeline folder (no model_index.json)")
    try:
        return SDTPipeline.from_pretrained(str(folder), dtype=dtype)
    except Exception as e:  # noqa: BLE001 - truncated weights, bad configs: one message naming the folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot load the pipeline in {folder} ({type(e).__name__}: {first})") from None


def pipeline_sha256(folder: str | Path) -> str:
    """sha256 over every file of a pipeline folder (relative path and content): its identity for a resume."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix().encode("utf-8", "surrogateescape")
        digest.update(len(rel).to_bytes(8, "little") + rel + bytes.fromhex(sha256_file(f)))
    return digest.hexdigest()


def image_channels(pipe: SDTPipeline) -> int:
    """Channels of the pipeline's decoded output: the VAE's ``out_channels``, else the transformer's own."""
    if pipe.vae is not None:
        return int(pipe.vae.config.out_channels)
    return int(pipe.transformer.config.in_channels)


def check_image_output(pipe: SDTPipeline) -> None:
    """Refuse a pipeline whose output is not an RGB image (e.g. latents without a VAE) before any sampling.

    Raises:
        ValueError: the decoded output would not have 3 channels.
    """
    channels = image_channels(pipe)
    if channels != 3:
        what = ("its VAE decodes to" if pipe.vae is not None
                else "it has no VAE, so its 'images' are the transformer's")
        raise ValueError(
            f"this pipeline does not produce RGB images: {what} {channels} channels; ADM's npz and the metrics "
            f"need 3. A latent-space model needs its VAE in the pipeline (re-export it with the right VAE)"
        )


def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def lock_path(output: Path) -> Path:
    """``<output>.lock``: held for the life of a run (:func:`~..utils.run_lock.lock_run`)."""
    return output.with_name(output.name + ".lock")


def chunk_path(output: Path, chunk: int) -> Path:
    return shard_dir(output) / f"chunk-{chunk:06d}.npz"


def _write_npz(f: Any, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` (what ``np.savez`` writes) with fixed timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: _write_npz(f, arrays))


def _chunk_done(path: Path, size: int) -> bool:
    """A chunk file counts when it opens and lists ``size`` indices.

    Chunks are written to a temporary name and renamed, so reading the small ``indices`` array is
    enough here; the images are read (and checked) only when the npz is assembled.
    """
    if not path.exists():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "images" in z.files and z["indices"].shape[0] == size
    except Exception:  # noqa: BLE001 - any unreadable chunk is simply redone
        return False


@dataclass(frozen=True)
class SamplingSettings:
    """What determines the samples (and where they go)."""

    pipeline: str
    output: str
    num_samples: int = 50_000
    per_device_batch: int = 32
    guidance_scale: float = 1.5
    steps: int = 250
    scheduler: str | None = None  # None: the pipeline's own scheduler; else a name of SCHEDULER_NAMES
    labels: str = "random"
    seed: int = 0
    guide_first_3_channels: bool = False
    dtype: str = "float32"  # one of DTYPE_CHOICES; the old fp32 / fp16 / bf16 are mapped to them

    def __post_init__(self) -> None:
        # One name per dtype in settings.json, so a rerun given the old spelling still resumes.
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))

    def check(self) -> None:
        """Raises :class:`SettingError` naming the first bad value."""
        if Path(self.output).suffix != ".npz":
            raise SettingError("output", f"must end in .npz, got {self.output}")
        for name in ("num_samples", "per_device_batch", "steps"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be positive, got {getattr(self, name)}")
        for name, bound in (("num_samples", MAX_NUM_SAMPLES), ("per_device_batch", MAX_PER_DEVICE_BATCH)):
            if getattr(self, name) > bound:
                raise SettingError(name, f"must be at most {bound}, got {getattr(self, name)}")
        pipeline, output = Path(self.pipeline).resolve(), Path(self.output).resolve()
        if pipeline in output.parents:
            raise SettingError("output", f"{self.output} lies inside the pipeline folder {self.pipeline}: its shards "
                                         f"would change the pipeline's sha256, so a rerun after a kill would be refused "
                                         f"as another pipeline; write it outside the pipeline folder")
        if not 0 <= self.seed <= MAX_SEED:
            raise SettingError("seed", f"must lie in [0, {MAX_SEED}], got {self.seed}")
        if not math.isfinite(self.guidance_scale):
            raise SettingError("guidance_scale", f"must be finite, got {self.guidance_scale}")
        if self.dtype not in DTYPE_CHOICES:
            raise SettingError("dtype", f"must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            raise SettingError("scheduler", f"must be one of {SCHEDULER_NAMES} (or None), got {self.scheduler!r}")


def settings_of(settings: SamplingSettings, num_classes: int, pipeline_hash: str) -> dict:
    """What determines the samples: a rerun must match these to resume from the shards.  The pipeline is
    identified by the sha256 of its files; its path is recorded for information only."""
    recorded = {k: v for k, v in asdict(settings).items() if k != "output"}
    return {**recorded, "pipeline": str(Path(settings.pipeline).resolve()), "pipeline_sha256": pipeline_hash,
            "num_classes": num_classes}


def prepare_pipeline(settings: SamplingSettings, device: torch.device | str) -> SDTPipeline:
    """Load the pipeline, switch its scheduler only if asked, and check that it produces RGB images."""
    pipe = load_pipeline(settings.pipeline, torch_dtype(settings.dtype))
    if settings.scheduler is not None:
        pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
    check_image_output(pipe)
    check_finite_weights(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_output_files(output: Path) -> None:
    """Refuse to replace files this sampler did not make: an existing ``output`` without its shard folder beside
    it (e.g. ADM's reference batch given as ``--output`` by mistake), or a ``.json``
    beside it that is not a sampler's sidecar (e.g. ``sdt-fid``'s results for ``samples.npz``).

    Raises:
        ValueError: naming the file that would be replaced.
    """
    if output.exists() and not shard_dir(output).exists():  # shards of their own are matched by claim_shards
        raise ValueError(f"{output} exists and was not made by an earlier run of this command (no "
                         f"{shard_dir(output).name}/ beside it); refusing to replace it: choose another --output or "
                         f"delete it")
    sidecar = output.with_suffix(".json")
    if sidecar.is_file():
        try:
            ours = "pipeline_sha256" in json.loads(sidecar.read_bytes())
        except (ValueError, UnicodeDecodeError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"{sidecar} (where the npz's sidecar goes) exists and is not a sidecar of this command; "
                             f"refusing to replace it: choose another --output or move it")


def claim_shards(state: PartialState, output: Path, settings: dict) -> None:
    """Create ``<output>.shards/`` with its ``settings.json``, or check that an earlier run used the same settings.

    Every process checks before the main process writes, so a mismatch stops them all alike.

    Raises:
        SettingsMismatchError: the shards were made with other settings (another pipeline content included), or
            there are shards but no ``settings.json`` to tell what made them.
    """
    shards = shard_dir(output)
    settings_file = shards / "settings.json"
    if settings_file.exists():
        try:
            previous = json.loads(settings_file.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise SettingsMismatchError(f"{settings_file} is unreadable ({e}); the shards beside it cannot be "
                                        f"matched to settings: delete {shards}") from None
        if not isinstance(previous, dict):
            previous = {}
        if isinstance(previous.get("dtype"), str):  # shards of the last release name dtypes fp32 / fp16 / bf16
            previous["dtype"] = DTYPE_ALIASES.get(previous["dtype"], previous["dtype"])
        same = {k: v for k, v in settings.items() if k != "pipeline"}
        changed = sorted(k for k in same if previous.get(k) != same[k])
        if changed:
            what = ("another pipeline (its files differ from those the shards were made with)"
                    if "pipeline_sha256" in changed else "other settings")
            raise SettingsMismatchError(f"{shards} holds shards made with {what} ({', '.join(changed)}); "
                                        f"use another output or delete that folder")
    elif any(shards.glob("chunk-*.npz")):
        raise SettingsMismatchError(f"{shards} holds sample chunks but no settings.json, so what made them is "
                                    f"unknown; delete that folder (or use another output)")
    state.wait_for_everyone()
    if state.is_main_process and not settings_file.exists():
        shards.mkdir(parents=True, exist_ok=True)
        atomic_write_text(settings_file, json.dumps(settings, indent=2))
    state.wait_for_everyone()


def sample_chunk(pipe: SDTPipeline, settings: SamplingSettings, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 ``(n, H, W, 3)`` images of sample ``indices``, each from its own generator."""
    images = pipe(
        class_labels=labels[indices].tolist(),
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.steps,
        generator=[sample_generator(settings.seed, int(i)) for i in indices],
        output_type="pt",
        guide_first_3_channels=settings.guide_first_3_channels,
    ).images  # [0, 1]
    if images.shape[1] != 3:  # check_image_output should have caught it; never write such a shard
        raise ValueError(f"the pipeline produced {images.shape[1]}-channel images, expected 3")
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not bool(finite.all()):
        first = int(indices[int((~finite).nonzero()[0, 0])])
        raise NonFiniteSampleError(
            f"sample {first} (class {int(labels[first])}) holds NaN or infinite values ({int((~finite).sum())} of "
            f"the {len(indices)} samples of its chunk); nothing of the chunk was written. The pipeline's weights may "
            f"be damaged or diverged, or --guidance-scale {settings.guidance_scale} is too large")
    return to_uint8(images * 2 - 1)


def check_finite_weights(pipe: SDTPipeline) -> None:
    """Refuse a pipeline whose transformer or VAE holds NaN or infinite weights (a diverged or damaged export).

    Raises:
        ValueError: naming the first such tensor.
    """
    for part in ("transformer", "vae"):
        module = getattr(pipe, part, None)
        if module is None:
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"the pipeline's {part} holds NaN or infinite values in {name}: the export is "
                                 f"damaged or the training diverged; sample from another checkpoint")


def image_side(pipe: SDTPipeline) -> int:
    """Side in pixels of the images the pipeline makes: the latent side times the VAE's downsampling factor."""
    side = int(pipe.transformer.config.sample_size)
    if pipe.vae is not None:
        side *= 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return side


def check_disk_space(output: Path, num_samples: int, side: int) -> None:
    """Refuse a run whose shards and npz (twice ``num_samples × side² × 3`` bytes) cannot fit on the output's disk.

    Raises:
        OSError: naming the bytes needed and free.
    """
    need = 2 * num_samples * side * side * 3
    shards = shard_dir(output)
    if shards.is_dir():
        need -= sum(f.stat().st_size for f in shards.glob("chunk-*.npz"))
    folder = next((p for p in [output.parent, *output.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(f"{num_samples} images of {side}×{side} need about {need / 1e9:.3g} GB for the shards and the "
                      f"npz beside {output}, and {free / 1e9:.3g} GB are free")


def chunk_sizes(num_samples: int, per_device_batch: int) -> list[int]:
    """Sizes of the chunks of ``per_device_batch`` consecutive indices that ``0 .. num_samples - 1`` is cut into
    (the last one may be smaller)."""
    return [min(per_device_batch, num_samples - start) for start in range(0, num_samples, per_device_batch)]


def process_chunks(num_chunks: int, rank: int, world: int) -> range:
    """The chunks process ``rank`` of ``world`` samples: ``rank, rank + world, rank + 2·world, ...``."""
    return range(rank, num_chunks, world)


def process_indices(num_samples: int, per_device_batch: int, rank: int, world: int) -> np.ndarray:
    """The sample indices process ``rank`` of ``world`` draws (its chunks' indices, in order); over all ranks they
    cover ``0 .. num_samples - 1`` exactly once."""
    sizes = chunk_sizes(num_samples, per_device_batch)
    parts = [np.arange(c * per_device_batch, c * per_device_batch + sizes[c])
             for c in process_chunks(len(sizes), rank, world)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def run(settings: SamplingSettings, on_chunk: Callable[[int], None] | None = None) -> Path | None:
    """Sample (this process's share of) ``settings.num_samples`` images; the main process writes the npz.

    Args:
        settings: what to sample and where.
        on_chunk: optional ``callback(chunk)`` after each chunk file is written (progress reporting; tests
            use it to interrupt a run).

    Returns:
        The npz on the main process, ``None`` on the others.

    Raises:
        FileNotFoundError, ValueError: a bad pipeline folder, a pipeline that does not produce images, bad
            settings, or shards of an earlier run with other settings or another pipeline content
            (:class:`SettingsMismatchError`).
        OSError: the output cannot be written (checked before sampling).
        DamagedChunkError: a chunk was damaged (deleted; the same call redoes it).
    """
    settings.check()
    output = Path(settings.output)
    check_writable(output)  # before anything is sampled (raises OSError naming the file)
    check_output_files(output)
    # several processes without CUDA (``accelerate launch --multi_gpu`` on a CPU machine): gloo on the CPU
    state = PartialState(cpu=cpu_multiprocess())
    lock = lock_run(lock_path(output), f"--output {output}", is_main=state.is_main_process,
                    num_processes=state.num_processes)
    try:  # for the life of the run: a second run on the same --output is refused
        return _sample(settings, output, state, on_chunk)
    finally:
        lock.release()


def _sample(settings: SamplingSettings, output: Path, state: PartialState,
            on_chunk: Callable[[int], None] | None) -> Path | None:
    """The body of :func:`run`, under the output's lock."""
    pipeline_hash = pipeline_sha256(settings.pipeline) if Path(settings.pipeline).is_dir() else ""
    pipe = prepare_pipeline(settings, state.device)
    check_disk_space(output, settings.num_samples, image_side(pipe))
    num_classes = pipe.num_classes
    labels = sample_labels(settings.num_samples, num_classes, settings.labels, settings.seed)
    recorded = settings_of(settings, num_classes, pipeline_hash)
    claim_shards(state, output, recorded)

    batch = settings.per_device_batch
    sizes = chunk_sizes(settings.num_samples, batch)
    num_chunks = len(sizes)
    done = {c for c in range(num_chunks) if _chunk_done(chunk_path(output, c), sizes[c])}
    todo = [c for c in process_chunks(num_chunks, state.process_index, state.num_processes) if c not in done]
    bar = tqdm(total=settings.num_samples, initial=sum(sizes[c] for c in done), unit="img", desc="sampling",
               disable=not state.is_main_process, dynamic_ncols=True)
    start = time.time()
    for n_done, chunk in enumerate(todo):
        indices = np.arange(chunk * batch, chunk * batch + sizes[chunk])
        images = sample_chunk(pipe, settings, indices, labels)
        _atomic_savez(chunk_path(output, chunk), images=images, indices=indices, labels=labels[indices])
        if on_chunk is not None:
            on_chunk(chunk)
        # the main process counts for every process (they sample in step); the last round may be short
        bar.update(min(len(indices) * state.num_processes, bar.total - bar.n))
        bar.set_postfix(img_per_s=f"{(n_done + 1) * batch * state.num_processes / (time.time() - start):.2f}")
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    extra = {"num_processes": state.num_processes, "scheduler_class": type(pipe.scheduler).__name__}
    return assemble(output, num_chunks, sizes, labels, {**recorded, **extra})


def _read_chunk(path: Path, chunk: int, size: int, expected: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The images of a finished chunk, checked (readable, ``size`` uint8 RGB images of indices ``expected`` with
    their labels); a damaged chunk is deleted and named, so rerunning the command redoes it.

    Raises:
        DamagedChunkError: the chunk is damaged (and has been deleted).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            images, indices, chunk_labels = z["images"], z["indices"], z["labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != size or images.shape[3] != 3:
            raise ValueError(f"holds images of shape {images.shape} and dtype {images.dtype}, expected {size} "
                             f"uint8 RGB images")
        if not np.array_equal(indices, expected) or not np.array_equal(chunk_labels, labels[expected]):
            raise ValueError("its sample indices or labels are not those of this chunk")
    except Exception as e:  # noqa: BLE001 - zip CRC errors, truncation, wrong content: all mean "redo it"
        path.unlink(missing_ok=True)
        raise DamagedChunkError(f"chunk {chunk} ({path}) is damaged ({type(e).__name__}: {e}) and was deleted; run the "
                           f"same command again to sample it anew") from None
    return images


def assemble(output: Path, num_chunks: int, sizes: list[int], labels: np.ndarray, settings: dict) -> Path:
    """Join the chunks into ADM's npz (``arr_0`` images, ``arr_1`` labels) plus a JSON sidecar."""
    parts = []
    start = 0
    for c in range(num_chunks):
        path = chunk_path(output, c)
        if not _chunk_done(path, sizes[c]):
            path.unlink(missing_ok=True)
            raise DamagedChunkError(f"chunk {c} is missing or torn ({path}); run the same command again to finish it")
        parts.append(_read_chunk(path, c, sizes[c], np.arange(start, start + sizes[c]), labels))
        start += sizes[c]
    if start != len(labels) or len({p.shape[1:] for p in parts}) != 1:
        raise RuntimeError("the chunks do not hold N equally sized images; the shards are inconsistent")
    images = np.concatenate(parts)
    output.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(output, arr_0=images, arr_1=labels)

    sidecar = {
        **settings,
        "output": str(output.resolve()),
        "shape": list(images.shape),
        "conversion": "clamp(127.5 * x + 128, 0, 255) -> uint8",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "command": " ".join(sys.argv),
    }
    atomic_write_text(output.with_suffix(".json"), json.dumps(sidecar, indent=2))
    print(f"wrote {output} ({images.shape[0]} images {images.shape[1]}x{images.shape[2]}) and "
          f"{output.with_suffix('.json')}")
    return output


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``sdt-fid-sample`` (``eval/sample.py``)."""
    p = argparse.ArgumentParser(
        prog="sdt-fid-sample",
        description="Sample an ADM-format npz from an SDTPipeline for FID-50K (several processes: run it with "
                    "accelerate launch). Resumable: rerun the same command after a crash.",
        epilog="example: sdt-fid-sample --pipeline runs/sdt-p-xl2/pipeline --guidance-scale 1.5 --output samples.npz "
               "(8 GPUs: accelerate launch --multi_gpu --num_processes 8 -m sdt_diffusion.evaluation.sampling ...)",
    )
    p.add_argument("--pipeline", required=True,
                   help="an SDTPipeline folder (save_pretrained, the trainer's <output-dir>/pipeline, or sdt-export "
                        "of a checkpoint)")
    p.add_argument("--num-samples", type=int, default=50_000, help="images to sample (default 50000)")
    p.add_argument("--per-device-batch", type=int, default=32,
                   help="images per process and pipeline call; also the chunk size of the shards (default 32)")
    p.add_argument("--guidance-scale", type=float, default=1.5,
                   help="classifier-free guidance scale; <= 1 disables guidance (default 1.5)")
    p.add_argument("--steps", type=int, default=250, help="denoising steps (default 250, DiT's sampler)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="switch the pipeline's scheduler (ddpm: DDPM keeping the pipeline's variance type, ddim, "
                        "dpm: DPM-Solver++); default: the scheduler saved with the pipeline (the trainer exports "
                        "DiT's DDPM sampler)")
    p.add_argument("--labels", choices=("random", "balanced"), default="random",
                   help="class labels: uniform random, or every class equally often (default random)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the labels and of every sample's noise, in [0, 2**63 - 1] (default 0)")
    p.add_argument("--output", required=True, help="PATH.npz; shards go to PATH.npz.shards/")
    p.add_argument("--guide-first-3-channels", action="store_true",
                   help="guide only latent channels 0-2, exactly like DiT's published sampler")
    add_dtype_argument(p, default="float32", help="dtype the pipeline is loaded and run in")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sdt-fid-sample``; returns the exit code (0 ok, 2 bad flags or input, 1 a damaged chunk)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = SamplingSettings(**vars(args))
    try:
        settings.check()
    except SettingError as e:
        parser.error(f"--{e.field.replace('_', '-')} {e.problem}")
    try:
        check_writable(settings.output)
    except OSError as e:
        parser.error(f"--output {e}")
    try:
        run(settings)
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except DamagedChunkError as e:  # deleted: the same command redoes it
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":  # python -m sdt_diffusion.evaluation.sampling (what benchmarks/ablation.py launches)
    sys.exit(main())
