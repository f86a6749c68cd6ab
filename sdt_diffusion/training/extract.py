"""Pre-extract SD-VAE latents of a dataset (both horizontal flips) for ``train.py --latents-dir``.

Run with accelerate on any number of processes: process ``r`` of ``W`` encodes the contiguous block
``[N·r/W, N·(r+1)/W)`` of the dataset (disjoint, complete) into its own shard folder
``shard-<r>-of-<W>/``; after a barrier the main process checks every shard and writes ``metadata.json``,
which marks the cache complete.

What is stored, and why: for each image and each flip (index 0 as is, 1 horizontally flipped) the VAE
posterior's **mean and std** (``mean.npy``, ``std.npy``: ``(n, 2, C, h, w)``, float16 by default), not a
single sample.  Training then draws a fresh ``z = (mean + std·ε)·scaling_factor`` every time it sees the
image, exactly the distribution DiT trains on when it encodes on the fly (``latent_dist.sample()``); a
cache of samples would freeze one posterior draw per flip for the whole run.  With float16 this takes the
same space as fast-DiT's float32 samples of both flips (ImageNet-256: ~42 GB).  Also stored per shard:
``labels.npy`` and ``indices.npy`` (dataset row of each entry); plain ``.npy``, read with
``allow_pickle=False`` through memory maps.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import (
    AUTO_VERIFY_LIMIT,
    CACHE_FORMAT,
    CACHE_VERSION,
    DATASET_HELP,
    MAX_RESOLUTION,
    VERIFY_IMAGES,
    ImageClassDataset,
    UnreadableImageError,
    class_names_to_id2label,
    load_image_source,
    parse_data_files,
    refuse_streaming,
    verify_images,
)
from ..models.vae import vae_downsampling_factor, vae_scaling_factor
from ..utils.errors import error_line
from ..utils.files import atomic_write_text, check_writable
from ..utils.runtime import MAX_NUM_WORKERS, MAX_PER_DEVICE_BATCH, cpu_multiprocess, enable_tf32
from .config import ConfigError, check_output_outside_data
from .export import load_vae
from .flags import HelpFormatter
from .plan import DEFAULT_VAE, vae_config, vae_reference

__all__ = ["build_extract_parser", "cli", "extract_latents", "main"]

logger = logging.getLogger("sdt_diffusion.training.extract")
# Why --streaming is refused here: process r of W encodes the rows [N·r/W, N·(r+1)/W).
STREAMING_REASON = ("the cache's per-process blocks of rows and its row indices need a map-style dataset of known "
                    "length")


def build_extract_parser() -> argparse.ArgumentParser:
    """Flags of ``training/extract_latents.py``."""
    p = argparse.ArgumentParser(prog="extract_latents.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data-dir", type=str, default=None, help="image folder, one subfolder per class")
    p.add_argument("--dataset", type=str, default=None, help=DATASET_HELP["dataset"])
    p.add_argument("--dataset-config", type=str, default=None, help=DATASET_HELP["dataset_config"])
    p.add_argument("--dataset-split", type=str, default="train", help=DATASET_HELP["dataset_split"])
    p.add_argument("--data-files", type=str, default=None, help=DATASET_HELP["data_files"])
    p.add_argument("--image-column", type=str, default="image", help=DATASET_HELP["image_column"])
    p.add_argument("--label-column", type=str, default="label", help=DATASET_HELP["label_column"])
    p.add_argument("--streaming", action="store_true", help=f"stream --dataset: refused ({STREAMING_REASON})")
    p.add_argument("--vae", type=str, default=DEFAULT_VAE, help="AutoencoderKL folder or hub id")
    p.add_argument("--vae-subfolder", type=str, default=None)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--output-dir", type=str, required=True, help="the cache folder (train.py --latents-dir)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call (x2 with the flips)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    p.add_argument("--allow-tf32", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --output-dir")
    p.add_argument("--verify-images", choices=VERIFY_IMAGES, default="auto",
                   help=f"decode every image before encoding, naming the unreadable ones ('auto': when there are at "
                        f"most {AUTO_VERIFY_LIMIT})")
    p.add_argument("--cpu", action="store_true")
    return p


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
        "labels": torch.tensor([i["labels"] for i in items], dtype=torch.int64),
        "index": torch.tensor([i["index"] for i in items], dtype=torch.int64),
    }


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Check the flags before any compute; returns the VAE's config."""
    if bool(args.data_dir) == bool(args.dataset):
        raise ConfigError("pass exactly one of --data-dir, --dataset")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data-dir {args.data_dir}: not a directory")
    refuse_streaming(args.streaming, STREAMING_REASON)
    for flag, value in (("--dataset-config", args.dataset_config), ("--data-files", args.data_files)):
        if value and not args.dataset:
            raise ConfigError(f"{flag} {value!r} needs --dataset (it is load_dataset's argument)")
    parse_data_files(args.data_files)
    if args.batch_size <= 0 or args.resolution <= 0:
        raise ConfigError("--batch-size and --resolution must be > 0")
    if args.resolution > MAX_RESOLUTION:
        raise ConfigError(f"--resolution must lie in [1, {MAX_RESOLUTION}], got {args.resolution}")
    if args.batch_size > MAX_PER_DEVICE_BATCH:
        raise ConfigError(f"--batch-size must lie in [1, {MAX_PER_DEVICE_BATCH}], got {args.batch_size}")
    if not 0 <= args.num_workers <= MAX_NUM_WORKERS:
        raise ConfigError(f"--num-workers must lie in [0, {MAX_NUM_WORKERS}], got {args.num_workers}")
    out = Path(args.output_dir)
    # before check_writable creates the folder: shard folders inside a class folder tree would become a class
    local_dataset = args.dataset if args.dataset and Path(args.dataset).is_dir() else None
    check_output_outside_data("--output-dir", args.output_dir, {"--data-dir": args.data_dir, "--dataset": local_dataset})
    try:
        check_writable(out / "metadata.json")
    except OSError as e:
        raise ConfigError(f"--output-dir {out}: {e}") from None
    if (out / "metadata.json").exists() and not args.overwrite:
        raise ConfigError(f"--output-dir {out} already holds a latent cache; pass --overwrite to replace it")
    vae_cfg = vae_config(args.vae, args.vae_subfolder)
    factor = vae_downsampling_factor(vae_cfg)
    if args.resolution % factor:
        raise ConfigError(f"--resolution {args.resolution} is not divisible by the VAE's downsampling factor {factor}")
    return vae_cfg


def _encode_shard(vae: Any, dataset: ImageClassDataset, rows: range, shard: Path, latent_shape: tuple[int, int, int],
                  dtype: np.dtype, batch_size: int, num_workers: int, show_progress: bool) -> None:
    """Encode dataset ``rows`` (both flips) into ``shard``: ``mean.npy``, ``std.npy``, ``labels.npy``,
    ``indices.npy`` and, last, ``done.json``."""
    device = vae.device
    shard.mkdir(parents=True, exist_ok=True)
    shape = (len(rows), 2, *latent_shape)
    means = np.lib.format.open_memmap(shard / "mean.npy", mode="w+", dtype=dtype, shape=shape)
    stds = np.lib.format.open_memmap(shard / "std.npy", mode="w+", dtype=dtype, shape=shape)
    labels = np.zeros(len(rows), dtype=np.int64)
    indices = np.zeros(len(rows), dtype=np.int64)
    loader = DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    row = 0
    bar = tqdm(total=len(rows), disable=not show_progress, desc="encoding (rank 0)")
    with torch.no_grad():
        for batch in loader:
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            b = pixels.shape[0]
            dist = vae.encode(torch.cat([pixels, pixels.flip(-1)])).latent_dist
            means[row:row + b] = torch.stack([dist.mean[:b], dist.mean[b:]], dim=1).float().cpu().numpy().astype(dtype)
            stds[row:row + b] = torch.stack([dist.std[:b], dist.std[b:]], dim=1).float().cpu().numpy().astype(dtype)
            labels[row:row + b] = batch["labels"].numpy()
            indices[row:row + b] = batch["index"].numpy()
            row += b
            bar.update(b)
    bar.close()
    if row != len(rows):
        raise RuntimeError(f"{shard.name}: encoded {row} images, expected {len(rows)}")
    means.flush()
    stds.flush()
    del means, stds
    np.save(shard / "labels.npy", labels)
    np.save(shard / "indices.npy", indices)
    (shard / "done.json").write_text(json.dumps({"start": rows.start, "end": rows.stop}))


def _finished_shards(out: Path, world: int, num_images: int) -> list[str]:
    """The shard folders of a ``world``-process extraction, checked to be finished and to cover every image."""
    shards = sorted(p.name for p in out.glob(f"shard-*-of-{world:05d}"))
    covered = 0
    for name in shards:
        done = out / name / "done.json"
        if not done.is_file():
            raise RuntimeError(f"shard {name} did not finish")
        info = json.loads(done.read_text())
        covered += info["end"] - info["start"]
    if len(shards) != world or covered != num_images:
        raise RuntimeError(f"{len(shards)} shards cover {covered} of {num_images} images; expected {world} shards")
    return shards


def extract_latents(args: argparse.Namespace) -> Path:
    """Write the latent cache described in the module docstring; returns the cache folder."""
    vae_cfg = _check_args(args)
    out = Path(args.output_dir)
    accelerator = Accelerator(cpu=bool(args.cpu) or cpu_multiprocess())
    rank, world = accelerator.process_index, accelerator.num_processes
    with accelerator.local_main_process_first():
        source = load_image_source(args.data_dir, args.dataset, args.dataset_split, args.image_column, args.label_column,
                                   config=args.dataset_config, data_files=parse_data_files(args.data_files))
    verify_images([source], args.verify_images, accelerator)  # as the trainers do, before any file is written
    dataset = ImageClassDataset(source, args.resolution)
    n = len(dataset)
    if accelerator.is_main_process:
        if args.overwrite and out.exists():
            (out / "metadata.json").unlink(missing_ok=True)
            for old in out.glob("shard-*"):
                shutil.rmtree(old)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    if args.allow_tf32:
        enable_tf32()
    vae = load_vae(args.vae, args.vae_subfolder).to(accelerator.device)
    size = args.resolution // vae_downsampling_factor(vae_cfg)
    latent_shape = (int(vae_cfg["latent_channels"]), size, size)
    _encode_shard(vae, dataset, range(n * rank // world, n * (rank + 1) // world),
                  out / f"shard-{rank:05d}-of-{world:05d}", latent_shape, np.dtype(args.dtype), args.batch_size,
                  args.num_workers, accelerator.is_main_process)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        id2label = class_names_to_id2label(source.class_names, source.num_classes)
        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "stores": "posterior mean and std of both flips (index 0: as is, 1: horizontally flipped)",
            "num_samples": n,
            "num_shards": world,
            "shards": _finished_shards(out, world, n),
            "latent_shape": list(latent_shape),
            "dtype": args.dtype,
            "scaling_factor": vae_scaling_factor(vae_cfg),
            "vae": vae_reference(args.vae),
            "vae_subfolder": args.vae_subfolder,
            "resolution": args.resolution,
            "num_classes": source.num_classes,
            "class_names": source.class_names,
            "id2label": {str(k): v for k, v in id2label.items()} if id2label else None,
            "source": source.description,
        }
        atomic_write_text(out / "metadata.json", json.dumps(meta, indent=2))
        logger.info("latent cache of %d images (%d shards) written to %s", n, world, out)
    accelerator.wait_for_everyone()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 an image that broke during encoding, 2 bad flags or
    input)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    try:
        extract_latents(build_extract_parser().parse_args(argv))
    except UnreadableImageError as e:  # found while encoding (--verify-images none, or more images than 'auto' checks)
        print(f"extract_latents.py: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as e:
        print(f"extract_latents.py: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0


def cli() -> NoReturn:
    """Process entry point (``sdt-extract-latents``, ``training/extract_latents.py``, ``python -m
    sdt_diffusion.training.extract``)."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
