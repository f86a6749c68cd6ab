"""Console scripts of sdt-diffusion.

``sdt-sample``: sample a labelled image grid from a saved ``SDTPipeline`` folder.
``sdt-visualize``: plot the learned decay maps of a pipeline's transformer (per layer and head).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..pipelines import SDTPipeline
from ..schedulers import make_scheduler
from ..utils.files import atomic_write, check_writable
from ..utils.images import make_labelled_grid
from ..utils.runtime import default_device
from ..utils.seeding import index_generator
from .decay_maps import pipeline_decay_maps, plot_decay_maps

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _class_arg(text: str) -> int | str:
    """A class id (``"207"``) or a class name (``"golden retriever"``)."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def build_sample_parser() -> argparse.ArgumentParser:
    """Arguments of ``sdt-sample``."""
    parser = argparse.ArgumentParser(
        prog="sdt-sample",
        description="Sample class-conditional images from a saved SDTPipeline and write a labelled grid.",
        epilog='example: sdt-sample --pipeline my-pipeline --classes 207 360 "golden retriever" '
               "--guidance 4 --steps 50 --seed 0 --out grid.png",
    )
    parser.add_argument("--pipeline", required=True, help="folder written by SDTPipeline.save_pretrained")
    parser.add_argument("--classes", required=True, nargs="+", type=_class_arg,
                        help="class ids and/or names (any synonym, case-insensitive); one image each")
    parser.add_argument("--guidance", type=float, default=4.0,
                        help="classifier-free guidance scale; <= 1 disables guidance (default 4)")
    parser.add_argument("--steps", type=int, default=250, help="denoising steps (default 250, DiT's sampler)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i draws from its own seed derived from (seed, i), so an image does not depend on the others (default 0)")
    parser.add_argument("--out", default="samples.png", help="output image grid (default samples.png)")
    parser.add_argument("--scheduler", choices=("ddpm", "ddim", "dpm"), default=None,
                        help="ddpm (learned variance, DiT), ddim or dpm (DPM-Solver++); default: the saved one")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--ncols", type=int, default=None, help="images per grid row (default: about square)")
    parser.add_argument("--guide-first-3-channels", action="store_true",
                        help="guide only latent channels 0-2, as DiT's published sampler does")
    parser.add_argument("--full-names", action="store_true", help="caption with every synonym, not the first")
    return parser


def sample_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sdt-sample``; returns the exit status."""
    parser = build_sample_parser()
    args = parser.parse_args(argv)

    folder = Path(args.pipeline)
    if not (folder / "model_index.json").is_file():
        parser.error(f"--pipeline {folder} is not a saved pipeline folder (no model_index.json)")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        parser.error(f"--out {out}: not an image file name PIL can write (use .png or .jpg)")
    try:
        check_writable(out)  # before the pipeline is loaded and sampled, not after
    except OSError as err:
        parser.error(f"--out {err}")
    device = default_device(args.device)
    dtype = getattr(torch, args.dtype)

    pipe = SDTPipeline.from_pretrained(folder, dtype=dtype)
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(device)
    try:
        ids = pipe.resolve_class_labels(args.classes)
    except ValueError as err:
        parser.error(str(err))
    # CPU generators: the same seed gives the same noise on every device.
    generators = [index_generator(args.seed, i) for i in range(len(ids))]
    images = pipe(
        class_labels=ids,
        guidance_scale=args.guidance,
        num_inference_steps=args.steps,
        generator=generators,
        guide_first_3_channels=args.guide_first_3_channels,
    ).images
    names = pipe.get_label_names(ids, short=not args.full_names)
    grid = make_labelled_grid(images, [f"{i}: {n}" for i, n in zip(ids, names)], ncols=args.ncols)
    atomic_write(out, lambda f: grid.save(f, format=fmt))
    print(f"wrote {out} ({len(ids)} images: {', '.join(names)})")
    return 0


def build_visualize_parser() -> argparse.ArgumentParser:
    """Arguments of ``sdt-visualize``."""
    parser = argparse.ArgumentParser(
        prog="sdt-visualize",
        description="Plot, per layer and head, the learned decay row M[q, :] of a query patch beside the fixed "
                    "Manhattan decay of the same strength.",
        epilog='example: sdt-visualize --pipeline my-pipeline --class "golden retriever" --out decay.png',
    )
    parser.add_argument("--pipeline", required=True, help="folder written by SDTPipeline.save_pretrained")
    parser.add_argument("--class", dest="class_label", required=True, type=_class_arg, help="class id or name")
    parser.add_argument("--image", default=None,
                        help="input image (default: a sample of the class drawn with the pipeline)")
    parser.add_argument("--timestep", type=int, default=300, help="noise level the maps are taken at (0-999)")
    parser.add_argument("--query", type=int, nargs=2, metavar=("ROW", "COL"), default=None,
                        help="query patch on the token grid (default: the centre)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps when no --image is given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="decay_maps.png", help="output PNG (default decay_maps.png)")
    return parser


def visualize_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sdt-visualize``; returns the exit status."""
    parser = build_visualize_parser()
    args = parser.parse_args(argv)

    folder = Path(args.pipeline)
    if not (folder / "model_index.json").is_file():
        parser.error(f"--pipeline {folder} is not a saved pipeline folder (no model_index.json)")
    if not 0 <= args.timestep < 1000:
        parser.error(f"--timestep must lie in [0, 999], got {args.timestep}")
    image = None
    if args.image is not None:
        if not Path(args.image).is_file():
            parser.error(f"--image {args.image} does not exist")
        image = Image.open(args.image)
    device = default_device(args.device)
    pipe = SDTPipeline.from_pretrained(folder).to(device)
    try:
        label = pipe.resolve_class_labels([args.class_label])[0]
        maps, shown = pipeline_decay_maps(pipe, label, image=image, timestep=args.timestep,
                                          query=tuple(args.query) if args.query else None,
                                          num_inference_steps=args.steps, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    name = pipe.get_label_names([label])[0]
    title = (f"{maps.decay_mode} decay exp(M[q, :]) of query patch {maps.query} for '{name}' at t={maps.timestep}: "
             "learned (left) vs content-blind Manhattan decay of the same mean strength (right)")
    out = plot_decay_maps(maps, args.out, title=title, image=shown)
    print(f"wrote {out} ({maps.learned.shape[0]} layers x {maps.learned.shape[1]} heads)")
    return 0
