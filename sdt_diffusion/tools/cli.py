"""Console scripts of sdt-diffusion that work on a saved ``SDTPipeline`` folder.

``sdt-sample`` (``python -m sdt_diffusion.tools.cli sample``): sample a labelled image grid.
``sdt-visualize`` (``python -m sdt_diffusion.tools.cli visualize``): plot the learned decay maps of the
pipeline's transformer (per layer and head).

Both speak the project's one flag vocabulary (:mod:`sdt_diffusion.utils.cli_args`): ``--guidance-scale``,
``--output`` for the written file, ``--dtype {float32,float16,bfloat16}`` and classes by id or name. The old
spellings ``--guidance`` and ``--out`` still work for one release, with a one-line deprecation warning.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..pipelines import SDTPipeline
from ..schedulers import make_scheduler
from ..utils.cli_args import add_deprecated_alias, add_dtype_argument, class_arg, torch_dtype
from ..utils.files import atomic_write, check_writable
from ..utils.images import make_labelled_grid
from ..utils.runtime import default_device
from ..utils.seeding import index_generator
from .decay_maps import pipeline_decay_maps, plot_decay_maps

MAX_SEED = 2**63 - 1  # per-image seeds are taken modulo 2**63 - 1 (utils.seeding)
MAX_STEPS = 10_000  # DiT samples with 250; more is a typo, not a setting
MAX_GRID_IMAGES = 1024  # one grid image; sdt-fid-sample makes sample sets


def build_sample_parser() -> argparse.ArgumentParser:
    """Arguments of ``sdt-sample``."""
    parser = argparse.ArgumentParser(
        prog="sdt-sample",
        description="Sample class-conditional images from a saved SDTPipeline and write a labelled grid.",
        epilog='example: sdt-sample --pipeline my-pipeline --classes 207 360 "golden retriever" '
               "--guidance-scale 4 --steps 50 --seed 0 --output grid.png",
    )
    parser.add_argument("--pipeline", required=True, help="folder written by SDTPipeline.save_pretrained")
    parser.add_argument("--classes", required=True, nargs="+", type=class_arg,
                        help="class ids and/or names (any synonym, case-insensitive); one image each")
    parser.add_argument("--guidance-scale", type=float, default=4.0,
                        help="classifier-free guidance scale; <= 1 disables guidance (default 4.0)")
    parser.add_argument("--steps", type=int, default=250, help="denoising steps (default 250, DiT's sampler)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i draws from its own seed derived from (seed, i), so an image does not depend on the others (default 0)")
    parser.add_argument("--output", default="samples.png",
                        help="the image grid written, .png or .jpg (default samples.png)")
    parser.add_argument("--scheduler", choices=("ddpm", "ddim", "dpm"), default=None,
                        help="ddpm (learned variance, DiT), ddim or dpm (DPM-Solver++); default: the saved one")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dtype_argument(parser, default="float32", help="model dtype")
    parser.add_argument("--ncols", type=int, default=None, help="images per grid row (default: about square)")
    parser.add_argument("--guide-first-3-channels", action="store_true",
                        help="guide only latent channels 0-2, as DiT's published sampler does")
    parser.add_argument("--full-names", action="store_true", help="caption with every synonym, not the first")
    add_deprecated_alias(parser, "--guidance", "--guidance-scale")
    add_deprecated_alias(parser, "--out", "--output")
    return parser


def sample_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sdt-sample``; returns the exit status."""
    parser = build_sample_parser()
    args = parser.parse_args(argv)

    folder = Path(args.pipeline)
    if not (folder / "model_index.json").is_file():
        parser.error(f"--pipeline {folder} is not a saved pipeline folder (no model_index.json)")
    if not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps must lie in [1, {MAX_STEPS}], got {args.steps}")
    if not math.isfinite(args.guidance_scale):
        parser.error(f"--guidance-scale must be finite, got {args.guidance_scale}")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must lie in [0, {MAX_SEED}], got {args.seed}")
    if len(args.classes) > MAX_GRID_IMAGES:
        parser.error(f"--classes names {len(args.classes)} images; a grid holds at most {MAX_GRID_IMAGES}")
    if args.ncols is not None and args.ncols < 1:
        parser.error(f"--ncols must be >= 1, got {args.ncols}")
    out = Path(args.output)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        parser.error(f"--output {out}: not an image file name PIL can write (use .png or .jpg)")
    try:
        check_writable(out)  # before the pipeline is loaded and sampled, not after
    except OSError as err:
        parser.error(f"--output {err}")
    device = default_device(args.device)
    dtype = torch_dtype(args.dtype)

    try:
        pipe = SDTPipeline.from_pretrained(folder, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - truncated weights, bad configs: one line naming the folder
        first = (str(err).strip().splitlines() or [""])[0][:300]
        parser.exit(2, f"{parser.prog}: error: --pipeline {folder}: cannot load the pipeline "
                       f"({type(err).__name__}: {first})\n")
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(device)
    try:
        ids = pipe.resolve_class_labels(args.classes)
    except ValueError as err:
        parser.error(str(err))
    # CPU generators: the same seed gives the same noise on every device.
    generators = [index_generator(args.seed, i) for i in range(len(ids))]
    arrays = pipe(
        class_labels=ids,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        generator=generators,
        guide_first_3_channels=args.guide_first_3_channels,
        output_type="np",
    ).images
    bad = [i for i, image in enumerate(arrays) if not np.isfinite(image).all()]
    if bad:  # NaN would be written as black images
        parser.exit(1, f"{parser.prog}: error: image {bad[0]} (class {ids[bad[0]]}) holds NaN or infinite values "
                       f"({len(bad)} of {len(ids)} images); nothing was written. The pipeline's weights may be "
                       f"damaged or diverged, or --guidance-scale {args.guidance_scale} is too large\n")
    images = pipe.numpy_to_pil(arrays)
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
        epilog='example: sdt-visualize --pipeline my-pipeline --class "golden retriever" --output decay.png',
    )
    parser.add_argument("--pipeline", required=True, help="folder written by SDTPipeline.save_pretrained")
    parser.add_argument("--class", dest="class_label", required=True, type=class_arg, metavar="CLASS",
                        help="class id or name (any synonym, case-insensitive)")
    parser.add_argument("--image", default=None,
                        help="input image (default: a sample of the class drawn with the pipeline)")
    parser.add_argument("--timestep", type=int, default=300,
                        help="noise level the maps are taken at, 0-999 (default 300)")
    parser.add_argument("--query", type=int, nargs=2, metavar=("ROW", "COL"), default=None,
                        help="query patch on the token grid (default: the centre)")
    parser.add_argument("--steps", type=int, default=25,
                        help="sampling steps when no --image is given (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample drawn when no --image is given (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", default="decay_maps.png", help="the PNG written (default decay_maps.png)")
    add_deprecated_alias(parser, "--out", "--output")
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
        from ..data.images import (  # imports datasets: only when an image is given
            UnreadableImageError,
            open_image,
        )

        try:
            image = open_image(args.image, args.image)  # 16-bit images scaled as everywhere (data.to_rgb)
        except UnreadableImageError as err:
            parser.error(f"--image {err}")
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
    out = plot_decay_maps(maps, args.output, title=title, image=shown)
    print(f"wrote {out} ({maps.learned.shape[0]} layers x {maps.learned.shape[1]} heads)")
    return 0


# ``python -m sdt_diffusion.tools.cli COMMAND ...``: the console scripts without an installed entry point.
COMMANDS = {"sample": sample_main, "visualize": visualize_main}
_USAGE = ("usage: python -m sdt_diffusion.tools.cli {sample,visualize} [ARGS ...]\n\n"
          "  sample     sdt-sample: a labelled image grid from a saved pipeline\n"
          "  visualize  sdt-visualize: the learned decay maps of a pipeline's transformer\n\n"
          "'python -m sdt_diffusion.tools.cli COMMAND --help' lists a command's flags.\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named by the first argument (``sample`` or ``visualize``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{_USAGE}\nsdt_diffusion.tools.cli: error: {given}; choose sample or visualize", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
