"""Flags of the diffusion trainer (``training/train.py``, ``sdt-train``): the shared ones (:mod:`.config`) plus
those of latent diffusion, with DiT's recipe for SDT-P in ``recipes/sdt-p.yaml`` and the paper's 400K-step runs
in ``recipes/sdt-p-{s2,b2,l2,xl2}.yaml``.

A YAML ``--config`` (a path or a packaged recipe name) supplies values that command-line flags override: its
keys are the flag names (``max_steps`` or ``max-steps``), unknown keys are rejected, and each value goes through
its flag's type.  :func:`settings_from_args` checks everything that can be checked without data, models or
devices; the engine checks the rest (batch split, shapes against the data) before any compute starts.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..models.registry import all_presets, model_class_of
from ..schedulers import NUM_TRAIN_TIMESTEPS
from ..utils.cli_args import add_deprecated_alias, class_arg
from ..utils.errors import ConfigError
from .config import Settings, check_positive, parse_model_kwargs, settings_from_flags
from .fid import FidSettings, check_fid_settings
from .flags import build_parser as build_flag_parser
from .flags import flag, parse_flags

__all__ = ["RECIPE", "DiffusionSettings", "build_parser", "parse_args", "sample_classes", "settings_from_args"]

RECIPE = "sdt-p"  # recipes/sdt-p.yaml: the defaults
HELPS = {  # what the shared flags mean here
    "model": "preset: SDT-P-{S,B,L,XL}/{2,4,8}, or the DiT baseline DiT-{S,B,L,XL}/{2,4,8}",
    "model_kwargs": "JSON object of any config field of the preset's model (SDTTransformer2DModel, or "
                    "DiTTransformer2DModel for DiT), e.g. '{\"num_layers\": 2}'",
    "resolution": "image side after ADM centre crop (default: 256; with --latents-dir the cache's)",
    "eval_data_dir": "held-out image folder (the training classes) for eval_loss",
}


@dataclass(frozen=True, kw_only=True)
class SDTModelSettings:
    title: ClassVar[str] = "SDT-P model"
    decay_mode: str | None = flag(None, "override the decay variant (cdsf, none, fixed, ...; not for DiT)")


@dataclass(frozen=True, kw_only=True)
class LatentSettings:
    title: ClassVar[str] = "latents"
    latents_dir: str | None = flag(None, "latent cache written by training/extract_latents.py (instead of "
                                         "--data-dir / --dataset)")
    vae: str | None = flag(None, "AutoencoderKL folder or hub id, 'none' = pixel space (default "
                                 "stabilityai/sd-vae-ft-ema; with --latents-dir the cache's VAE)")
    vae_subfolder: str | None = flag(None, "subfolder of --vae")
    random_flip: bool = flag(True, "random horizontal flips", negative="--no-flip")


@dataclass(frozen=True, kw_only=True)
class HeldOutSettings:
    title: ClassVar[str] = "held-out loss (--eval-data-dir)"
    eval_every: int = flag(1000, "steps between held-out losses")
    eval_max_samples: int = flag(512, "held-out images used (evenly spaced)")


@dataclass(frozen=True, kw_only=True)
class SampleSettings:
    title: ClassVar[str] = "samples and export"
    export_every: int = flag(0, "steps between pipeline exports (0: only at the end)")
    sample_every: int = flag(0, "steps between EMA sample grids (0: off)")
    sample_steps: int = flag(50, f"DDPM steps for the sample grids (at most the {NUM_TRAIN_TIMESTEPS} training "
                                 f"timesteps)")
    guidance_scale: float = flag(help="classifier-free guidance scale of the sample grids")
    sample_classes: str | None = flag(None, "comma-separated class ids or names for the grids (default: DiT's 8 "
                                            "ImageNet classes, or all of up to 16)")


@dataclass(frozen=True, kw_only=True)
class DiffusionSettings(Settings):
    """Everything a diffusion run is configured by."""

    sdt: SDTModelSettings
    latents: LatentSettings
    held_out: HeldOutSettings
    samples: SampleSettings
    fid: FidSettings = field(default_factory=FidSettings)  # off unless --fid-every is given


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``training/train.py``, its defaults from ``recipes/sdt-p.yaml``."""
    parser = build_flag_parser(DiffusionSettings, "train.py", "Train SDT-P (class-conditional latent diffusion, "
                               "DiT's recipe) with accelerate.", RECIPE, HELPS)
    add_deprecated_alias(parser, "--sample-guidance-scale", "--guidance-scale")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, with ``--config`` YAML values as defaults that command-line flags override."""
    return parse_flags(build_parser(), argv)


def sample_classes(settings: DiffusionSettings) -> tuple[int | str, ...] | None:
    """``--sample-classes`` as ids and names (resolved against the data's classes by the plan; ``None``: the
    default classes).

    Raises:
        ConfigError: an empty item.
    """
    text = settings.samples.sample_classes
    try:
        return tuple(class_arg(c) for c in str(text).split(",")) if text else None
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--sample-classes {text!r}: {e}") from None


def check_diffusion(s: DiffusionSettings) -> None:
    """Check the diffusion flags and their combinations without touching data, models or devices.

    Raises:
        ConfigError: naming the flags at fault.
    """
    sources = {"--data-dir": s.data.data_dir, "--dataset": s.data.dataset, "--latents-dir": s.latents.latents_dir}
    given = [k for k, v in sources.items() if v]
    if len(given) != 1:
        raise ConfigError(f"pass exactly one of --data-dir, --dataset, --latents-dir (got "
                          f"{' and '.join(given) if given else 'none'})")
    latents = s.latents.latents_dir
    if latents and not Path(latents).is_dir():
        raise ConfigError(f"--latents-dir {latents}: not a directory")
    if latents and not (Path(latents) / "metadata.json").is_file():
        raise ConfigError(f"--latents-dir {latents}: no metadata.json (an incomplete or foreign cache; run "
                          f"training/extract_latents.py)")
    try:
        model_class = model_class_of(s.model.model)
    except ValueError:
        raise ConfigError(f"--model {s.model.model!r} is not a preset; choose one of {all_presets()}") from None
    fields = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    bad = sorted(k for k in parse_model_kwargs(s.model.model_kwargs) if k not in fields)
    if bad:
        raise ConfigError(f"--model-kwargs: unknown {model_class.__name__} fields {bad}")
    if s.run.max_steps is None:
        raise ConfigError("--max-steps is required")
    values = s.values()
    check_positive(values, ("sample_steps", "eval_every", "eval_max_samples"))
    check_positive(values, ("export_every", "sample_every"), allow_zero=True)
    if s.samples.sample_steps > NUM_TRAIN_TIMESTEPS:  # the sample grid of the run's tail would fail after training
        raise ConfigError(f"--sample-steps must lie in [1, {NUM_TRAIN_TIMESTEPS}] (the DDPM scheduler's training "
                          f"timesteps), got {s.samples.sample_steps}")
    if not math.isfinite(s.samples.guidance_scale):
        raise ConfigError(f"--guidance-scale must be finite, got {s.samples.guidance_scale}")
    sample_classes(s)
    check_fid_settings(s.fid)


def settings_from_args(args: argparse.Namespace) -> DiffusionSettings:
    """Check the parsed flags and turn them into :class:`DiffusionSettings`.

    Raises:
        ConfigError: a bad flag or flag combination.
    """
    return settings_from_flags(DiffusionSettings, args, check_diffusion)
