"""Distributed, resumable sampling of ADM-format sample batches for FID-50K (``eval/sample.py``).

Every sample index i is generated exactly once, from noise seeded by (seed, i) and a class label fixed
by (seed, labels mode), so the result does not depend on the number of processes.  Work is cut into
chunks of ``per_device_batch`` indices; process r takes chunks r, r+P, r+2P, ... and writes each one
atomically as ``<output>.shards/chunk-XXXXXX.npz``.  A rerun skips chunks already on disk, so a crash
or kill loses at most the chunks in flight.  The main process finally assembles ADM's layout:
``arr_0`` uint8 (N, H, W, 3) converted as ``clamp(127.5 x + 128, 0, 255)`` and ``arr_1`` the labels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from accelerate import PartialState
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ..models import SDTTransformer2DModel
from ..pipelines import SDTPipeline
from ..schedulers import SCHEDULER_NAMES, make_scheduler
from ..utils.files import atomic_write
from ..utils.runtime import cpu_multiprocess
from ..utils.seeding import index_generator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """Class label of every sample index: ``random`` (uniform, like DiT) or ``balanced`` (N / C each)."""
    rng = np.random.default_rng([seed, 0x5D7])
    if mode == "random":
        return rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    if mode == "balanced":
        if num_samples % num_classes:
            raise ValueError(f"--labels balanced needs --num-samples divisible by {num_classes} classes, "
                             f"got {num_samples}")
        return rng.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
    raise ValueError(f"--labels must be 'random' or 'balanced', got {mode!r}")


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index``: independent of batch composition and process count."""
    return index_generator(seed, index)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3) as ``clamp(127.5 x + 128, 0, 255)`` (ADM/DiT)."""
    x = (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def pipeline_from_checkpoint(checkpoint: str | Path, vae: str | None = None, dtype: torch.dtype = torch.float32):
    """An ``SDTPipeline`` with the EMA weights of a training checkpoint (``<run>/checkpoint-<step>``).

    The EMA is read with ``torch.load(weights_only=True)`` (no arbitrary unpickling); ``vae`` is a local
    folder or hub id of an ``AutoencoderKL``, ``"none"`` for pixel space, or ``None`` to use the one the run
    trained with.
    """
    from ..training.checkpointing import read_training_state

    checkpoint = Path(checkpoint)
    state = read_training_state(checkpoint)
    ema_file = checkpoint / "custom_checkpoint_0.pkl"
    if not ema_file.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no EMA state ({ema_file.name}); FSDP checkpoints keep the EMA in per-rank shards: "
            "sample from the run's exported pipeline folder instead"
        )
    ema = torch.load(ema_file, map_location="cpu", weights_only=True)
    transformer = SDTTransformer2DModel.from_config(state["model_config"])
    params = list(transformer.parameters())
    if len(ema["shadow"]) != len(params):
        raise ValueError(f"{ema_file} holds {len(ema['shadow'])} tensors, the model config has {len(params)}")
    with torch.no_grad():
        for p, s in zip(params, ema["shadow"]):
            if p.shape != s.shape:
                raise ValueError(f"{ema_file}: EMA tensor of shape {tuple(s.shape)} for a parameter of {tuple(p.shape)}")
            p.copy_(s)
    vae_name = vae if vae is not None else state.get("vae")
    autoencoder = None
    if vae_name and vae_name.lower() != "none":
        autoencoder = AutoencoderKL.from_pretrained(vae_name)
    id2label = {int(k): v for k, v in state["id2label"].items()} if state.get("id2label") else None
    pipe = SDTPipeline(transformer=transformer.eval(), vae=autoencoder, scheduler=None, id2label=id2label)
    return pipe.to(dtype=dtype)


def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def chunk_path(output: Path, chunk: int) -> Path:
    return shard_dir(output) / f"chunk-{chunk:06d}.npz"


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _chunk_done(path: Path, size: int) -> bool:
    """A chunk file counts when it opens and lists ``size`` indices.

    Chunks are written to a temporary name and renamed, so reading the small ``indices`` array is
    enough; the images are not read here (at 50K samples that would be gigabytes per process).
    """
    if not path.exists():
        return False
    try:
        with np.load(path) as z:
            return "images" in z.files and z["indices"].shape[0] == size
    except Exception:
        return False


def settings_of(args: argparse.Namespace, num_classes: int) -> dict:
    """What determines the samples: a rerun must match these to resume from the shards."""
    return {
        "pipeline": str(Path(args.pipeline).resolve()) if args.pipeline else None,
        "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        "vae": args.vae,
        "num_samples": args.num_samples,
        "per_device_batch": args.per_device_batch,
        "guidance_scale": args.guidance_scale,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "labels": args.labels,
        "seed": args.seed,
        "guide_first_3_channels": args.guide_first_3_channels,
        "dtype": args.dtype,
        "num_classes": num_classes,
    }


def run(args: argparse.Namespace) -> Path | None:
    """Sample (this process's share of) ``args.num_samples`` images; the main process writes the npz."""


    # several processes without CUDA (``accelerate launch --multi_gpu`` on a CPU machine): gloo on the CPU
    state = PartialState(cpu=cpu_multiprocess())
    output = Path(args.output)
    if output.suffix != ".npz":
        raise ValueError(f"--output must end in .npz, got {output}")
    if args.num_samples < 1 or args.per_device_batch < 1 or args.steps < 1:
        raise ValueError("--num-samples, --per-device-batch and --steps must be positive")
    dtype = DTYPES[args.dtype]
    if (args.pipeline is None) == (args.checkpoint is None):
        raise ValueError("give exactly one of --pipeline DIR and --checkpoint DIR")
    if args.checkpoint is not None:
        pipe = pipeline_from_checkpoint(args.checkpoint, args.vae, dtype)
    elif not (Path(args.pipeline) / "model_index.json").exists():
        raise FileNotFoundError(f"--pipeline {args.pipeline} is not an SDTPipeline folder (no model_index.json)")
    else:
        pipe = SDTPipeline.from_pretrained(args.pipeline, dtype=dtype)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.transformer.num_classes
    labels = sample_labels(args.num_samples, num_classes, args.labels, args.seed)
    settings = settings_of(args, num_classes)

    shards = shard_dir(output)
    settings_file = shards / "settings.json"
    if state.is_main_process:
        shards.mkdir(parents=True, exist_ok=True)
        if settings_file.exists():
            previous = json.loads(settings_file.read_text())
            if previous != settings:
                changed = sorted(k for k in settings if previous.get(k) != settings[k])
                raise SystemExit(
                    f"{shards} holds shards made with other settings ({', '.join(changed)}); "
                    f"use another --output or delete that folder"
                )
        else:
            settings_file.write_text(json.dumps(settings, indent=2))
    state.wait_for_everyone()

    batch = args.per_device_batch
    num_chunks = -(-args.num_samples // batch)
    sizes = [min(batch, args.num_samples - c * batch) for c in range(num_chunks)]
    mine = [c for c in range(state.process_index, num_chunks, state.num_processes)]
    done = {c for c in range(num_chunks) if _chunk_done(chunk_path(output, c), sizes[c])}
    todo = [c for c in mine if c not in done]
    done_before = sum(sizes[c] for c in done)
    stop_after = int(os.environ.get("SDT_DEBUG_STOP_AFTER_CHUNKS", "0"))  # test hook: simulate a crash

    bar = tqdm(total=args.num_samples, initial=done_before, unit="img", desc="sampling",
               disable=not state.is_main_process, dynamic_ncols=True)
    start = time.time()
    for n_done, chunk in enumerate(todo):
        if stop_after and n_done >= stop_after:
            os._exit(17)
        indices = np.arange(chunk * batch, chunk * batch + sizes[chunk])
        generators = [sample_generator(args.seed, int(i)) for i in indices]
        images = pipe(
            class_labels=labels[indices].tolist(),
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps,
            generator=generators,
            output_type="pt",
            guide_first_3_channels=args.guide_first_3_channels,
        ).images  # [0, 1]
        _atomic_savez(chunk_path(output, chunk), images=to_uint8(images * 2 - 1), indices=indices,
                      labels=labels[indices])
        bar.update(len(indices) * state.num_processes)
        bar.set_postfix(img_per_s=f"{(n_done + 1) * batch * state.num_processes / (time.time() - start):.2f}")
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return assemble(output, num_chunks, sizes, labels, {**settings, "num_processes": state.num_processes})


def assemble(output: Path, num_chunks: int, sizes: list[int], labels: np.ndarray, settings: dict) -> Path:
    """Join the chunks into ADM's npz (``arr_0`` images, ``arr_1`` labels) plus a JSON sidecar."""
    parts, seen = [], []
    for c in range(num_chunks):
        path = chunk_path(output, c)
        if not _chunk_done(path, sizes[c]):
            raise RuntimeError(f"chunk {c} is missing or torn ({path}); run the same command again to finish it")
        with np.load(path) as z:
            if z["images"].shape[0] != sizes[c]:
                raise RuntimeError(f"chunk {c} ({path}) holds {z['images'].shape[0]} images, expected {sizes[c]}")
            parts.append(z["images"])
            seen.append(z["indices"])
    indices = np.concatenate(seen)
    if not np.array_equal(indices, np.arange(len(labels))):
        raise RuntimeError("sample indices are not exactly 0..N-1 once each; the shards are inconsistent")
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
    output.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    print(f"wrote {output} ({images.shape[0]} images {images.shape[1]}x{images.shape[2]}) and "
          f"{output.with_suffix('.json')}")
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample an ADM-format npz from an SDTPipeline (run with accelerate launch).")
    p.add_argument("--pipeline", default=None, help="an SDTPipeline folder (save_pretrained / training export)")
    p.add_argument("--checkpoint", default=None,
                   help="a training checkpoint folder (<run>/checkpoint-<step>): its EMA weights are sampled")
    p.add_argument("--vae", default=None,
                   help="with --checkpoint: AutoencoderKL folder or hub id, or 'none' (default: the run's --vae)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--per-device-batch", type=int, default=32)
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="ddpm",
                   help="ddpm = the pipeline's DDPM with learned-range variance (DiT's sampler)")
    p.add_argument("--labels", choices=("random", "balanced"), default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="PATH.npz; shards go to PATH.npz.shards/")
    p.add_argument("--guide-first-3-channels", action="store_true",
                   help="guide only latent channels 0-2, exactly like DiT's published sampler")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    return p


def main(argv: list[str] | None = None) -> Path | None:
    """Entry point of ``eval/sample.py``."""
    return run(build_parser().parse_args(argv))
