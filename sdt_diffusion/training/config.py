"""Command-line flags and YAML configs of ``training/train.py``; static validation of flag combinations.

A YAML config (``--config``) supplies defaults: its keys are the flags' destination names (``max_steps`` or
``max-steps``), unknown keys are rejected, and flags given on the command line override it.  Everything
that can be checked without data, models or devices is checked by :func:`validate_args`; the trainer
checks the rest (batch divisibility, shapes against the data) before any compute starts.

:func:`settings_from_args` turns the parsed flags into :class:`TrainSettings`, the explicit values the
training steps take (one small frozen dataclass per concern), so nothing below the command line reads the
``argparse`` namespace.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..models.registry import all_presets, model_class_of
from ..utils.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataSpec",
    "HeldOutSpec",
    "Intervals",
    "ModelSpec",
    "OptimSpec",
    "RuntimeSpec",
    "SampleSpec",
    "TrainSettings",
    "build_parser",
    "load_yaml_config",
    "parse_args",
    "parse_model_kwargs",
    "settings_from_args",
    "validate_args",
]

REPORT_TO = ("tensorboard", "wandb", "all", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
MAX_SEED = 2**31 - 1  # numpy's global seed must stay below 2**32 after accelerate adds the process index


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only for flags whose default says something (not ``None`` or on/off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``training/train.py`` (about 75 lines: one flat ``add_argument`` per flag, grouped as
    in ``--help``; splitting it would only scatter the list)."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train SDT-P (class-conditional latent diffusion, DiT's recipe) with accelerate.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", type=str, default=None,
                   help="YAML file of defaults (keys = flag names); command-line flags override it")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="SDT-P-XL/2", help="preset: SDT-P-{S,B,L,XL}/{2,4,8}, or the DiT baseline DiT-{S,B,L,XL}/{2,4,8}")
    g.add_argument("--decay-mode", type=str, default=None, help="override the decay variant (cdsf, none, fixed, ...)")
    g.add_argument("--alpha", type=float, default=None, help="override the CDSF scale alpha")
    g.add_argument("--attention-backend", type=str, default=None, help="override the attention backend")
    g.add_argument("--model-kwargs", type=str, default=None,
                   help='JSON object of any config field of the preset\'s model (SDTTransformer2DModel, or '
                        'DiTTransformer2DModel for DiT), e.g. \'{"num_layers": 2}\'')

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, default=None, help="image folder, one subfolder per class")
    g.add_argument("--dataset", type=str, default=None, help="a datasets dataset saved with save_to_disk")
    g.add_argument("--dataset-split", type=str, default="train", help="split of a saved DatasetDict")
    g.add_argument("--image-column", type=str, default="image")
    g.add_argument("--label-column", type=str, default="label")
    g.add_argument("--latents-dir", type=str, default=None, help="latent cache written by training/extract_latents.py")
    g.add_argument("--resolution", type=int, default=None,
                   help="image side after ADM centre crop (default 256; with --latents-dir the cache's)")
    g.add_argument("--vae", type=str, default=None,
                   help="AutoencoderKL folder or hub id, 'none' = pixel space (default stabilityai/sd-vae-ft-ema; "
                        "with --latents-dir the cache's VAE)")
    g.add_argument("--vae-subfolder", type=str, default=None)
    g.add_argument("--random-flip", dest="random_flip", action="store_true", default=True,
                   help="random horizontal flips (default on)")
    g.add_argument("--no-flip", dest="random_flip", action="store_false", help="disable random horizontal flips")
    g.add_argument("--num-workers", type=int, default=4, help="data-loader worker processes per GPU")
    g.add_argument("--eval-data-dir", type=str, default=None, help="held-out image folder for eval_loss")
    g.add_argument("--eval-every", type=int, default=1000, help="steps between held-out losses")
    g.add_argument("--eval-max-samples", type=int, default=512, help="held-out images used (evenly spaced)")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=str, default=None, help="checkpoints, logs, samples, exported pipeline")
    g.add_argument("--max-steps", type=int, default=400_000, help="optimizer steps")
    g.add_argument("--global-batch-size", type=int, default=256)
    g.add_argument("--per-device-batch", type=int, default=None,
                   help="micro-batch per process; default global/processes (gradient accumulation fills the rest)")
    g.add_argument("--seed", type=int, default=0, help=f"in [0, {MAX_SEED}]")
    g.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (DiT: none)")
    g.add_argument("--mixed-precision", type=str, default=None, choices=MIXED_PRECISION,
                   help="default: accelerate's config")
    g.add_argument("--allow-tf32", action="store_true", help="TF32 matmuls/convolutions on Ampere+")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")

    g = p.add_argument_group("checkpoints and export")
    g.add_argument("--checkpoint-every", type=int, default=10_000)
    g.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept; 0 keeps all")
    g.add_argument("--resume", type=str, default=None,
                   help="'latest' (newest checkpoint in --output-dir, error if none), 'auto' (latest if any) or a path")
    g.add_argument("--export-every", type=int, default=0, help="steps between pipeline exports (0: only at the end)")
    g.add_argument("--allow-inexact-resume", action="store_true",
                   help="resume even where the continuation cannot equal an uninterrupted run (a missing or "
                        "unusable RNG state file, another --seed or batch layout); the log and metrics.jsonl say so")

    g = p.add_argument_group("logging and samples")
    g.add_argument("--report-to", type=str, default="tensorboard", choices=REPORT_TO)
    g.add_argument("--tracker-project", type=str, default="sdt-diffusion")
    g.add_argument("--log-every", type=int, default=10, help="steps per metrics line / tracker point")
    g.add_argument("--sample-every", type=int, default=0, help="steps between EMA sample grids (0: off)")
    g.add_argument("--sample-steps", type=int, default=50, help="DDPM steps for the sample grids")
    g.add_argument("--sample-guidance-scale", type=float, default=4.0)
    g.add_argument("--sample-classes", type=str, default=None, help="comma-separated class ids for the grids")
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=True)
    return p


def _option_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in ("help", "config")}


def _config_value(action: argparse.Action, key: str, value: Any) -> Any:
    """A YAML value for ``action`` converted the way the flag converts its text, or a ``ValueError`` saying why not.

    Counts must be integers (``2.7`` or ``2.0`` are refused, not rounded), switches must be ``true``/``false``
    (a quoted ``"no"`` is a string, not false), numbers may be written as YAML numbers or as text.
    """
    if value is None:
        if action.default is not None:
            raise ValueError(f"{key} cannot be null (default {action.default!r})")
        return None
    if action.nargs == 0:  # an on/off switch: the key is its destination, the value its state
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if action.dest == "model_kwargs" and isinstance(value, dict):
        return json.dumps(value)
    if action.dest == "sample_classes" and isinstance(value, list | int) and not isinstance(value, bool):
        value = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{key} must be an integer, got {value!r} ({type(value).__name__})")
        value = int(value)
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
        value = float(value)
    elif not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{key} must be one of {list(action.choices)}, got {value!r}")
    return value


def load_yaml_config(path: str | os.PathLike, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Read a YAML config as ``{dest: value}``; keys may use dashes or underscores; each value goes through its
    flag's type (and choices).

    Raises:
        ConfigError: the file is missing, is not a mapping, has keys that are not flags, or values of the wrong
            type.
    """
    parser = parser or build_parser()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            unknown.append(str(key))
            continue
        try:
            out[dest] = _config_value(actions[dest], str(key), value)
        except ValueError as e:
            raise ConfigError(f"--config {path}: {e}") from None
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {sorted(unknown)}; valid keys: {sorted(actions)}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, with ``--config`` YAML values as defaults that command-line flags override."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_yaml_config(pre.config, parser))
    args = parser.parse_args(argv)
    return args


def parse_model_kwargs(value: str | dict | None) -> dict[str, Any]:
    """``--model-kwargs`` as a dict (a JSON object string, a dict or ``None``)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs is not valid JSON ({e}): {value!r}") from None
    if not isinstance(out, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {value!r}")
    return out


def _positive(args: argparse.Namespace, name: str, allow_zero: bool = False) -> None:
    value = getattr(args, name)
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate_args(args: argparse.Namespace) -> None:
    """Check flags and their combinations without touching data, models or devices.

    Raises:
        ConfigError: with a message naming the flags at fault.
    """
    if not args.output_dir:
        raise ConfigError("--output-dir is required")
    sources = {"--data-dir": args.data_dir, "--dataset": args.dataset, "--latents-dir": args.latents_dir}
    given = [k for k, v in sources.items() if v]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise ConfigError(f"pass exactly one of --data-dir, --dataset, --latents-dir (got {what})")
    for flag, value in sources.items():
        if value and not Path(value).is_dir():
            raise ConfigError(f"{flag} {value}: not a directory")
    if args.latents_dir and not (Path(args.latents_dir) / "metadata.json").is_file():
        raise ConfigError(
            f"--latents-dir {args.latents_dir}: no metadata.json (an incomplete or foreign cache; "
            f"run training/extract_latents.py)"
        )
    if args.eval_data_dir and not Path(args.eval_data_dir).is_dir():
        raise ConfigError(f"--eval-data-dir {args.eval_data_dir}: not a directory")
    try:
        model_class = model_class_of(args.model)
    except ValueError:
        raise ConfigError(f"--model {args.model!r} is not a preset; choose one of {all_presets()}") from None
    kwargs = parse_model_kwargs(args.model_kwargs)
    fields = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    bad = sorted(k for k in kwargs if k not in fields)
    if bad:
        raise ConfigError(f"--model-kwargs: unknown {model_class.__name__} fields {bad}")
    for name in ("max_steps", "global_batch_size", "per_device_batch", "checkpoint_every", "log_every",
                 "sample_steps", "eval_every", "eval_max_samples"):
        _positive(args, name)
    for name in ("keep_checkpoints", "export_every", "sample_every", "num_workers"):
        _positive(args, name, allow_zero=True)
    if args.resolution is not None and args.resolution <= 0:
        raise ConfigError(f"--resolution must be > 0, got {args.resolution}")
    for name in ("learning_rate", "weight_decay", "ema_decay", "max_grad_norm", "sample_guidance_scale", "alpha"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be finite, got {value}")
    if args.learning_rate <= 0:
        raise ConfigError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if args.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ConfigError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        raise ConfigError(f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must lie in [0, {MAX_SEED}], got {args.seed}")
    if args.per_device_batch is not None and args.per_device_batch > args.global_batch_size:
        raise ConfigError(
            f"--per-device-batch {args.per_device_batch} exceeds --global-batch-size {args.global_batch_size}"
        )
    if args.sample_classes:
        try:
            [int(c) for c in str(args.sample_classes).split(",")]
        except ValueError:
            raise ConfigError(f"--sample-classes must be comma-separated ints, got {args.sample_classes!r}") from None
    if args.resume not in (None, "latest", "auto") and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume {args.resume}: not a checkpoint directory (or pass 'latest' / 'auto')")


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DataSpec:
    """Where the training data comes from (exactly one of the three sources) and how it is read."""

    data_dir: str | None = None
    dataset: str | None = None
    dataset_split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    latents_dir: str | None = None
    resolution: int | None = None  # None: 256, or the latent cache's
    vae: str | None = None  # None: the default VAE (or the cache's); "none": pixel space
    vae_subfolder: str | None = None
    random_flip: bool = True
    num_workers: int = 4


@dataclass(frozen=True)
class ModelSpec:
    """A preset plus overrides of its model's config (``SDTTransformer2DModel``, or DiT's for ``DiT-*``)."""

    preset: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    decay_mode: str | None = None
    alpha: float | None = None
    attention_backend: str | None = None


@dataclass(frozen=True)
class OptimSpec:
    """AdamW and the EMA."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    max_grad_norm: float | None = None


@dataclass(frozen=True)
class Intervals:
    """How long the run is and how often each periodic task runs (0 = off where allowed)."""

    max_steps: int
    log_every: int = 10
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 3
    export_every: int = 0
    eval_every: int = 1000
    sample_every: int = 0


@dataclass(frozen=True)
class HeldOutSpec:
    """The held-out image folder for ``eval_loss`` (``None``: no held-out evaluation)."""

    data_dir: str | None = None
    max_samples: int = 512


@dataclass(frozen=True)
class SampleSpec:
    """The EMA sample grids."""

    steps: int = 50
    guidance_scale: float = 4.0
    classes: tuple[int, ...] | None = None  # None: default_sample_classes(num_classes)


@dataclass(frozen=True)
class RuntimeSpec:
    """Devices, precision and trackers."""

    cpu: bool = False
    mixed_precision: str | None = None
    compile: bool = False
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    report_to: str = "tensorboard"
    tracker_project: str = "sdt-diffusion"
    progress_bar: bool = True


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run is configured by, as explicit values."""

    output_dir: Path
    data: DataSpec
    model: ModelSpec
    intervals: Intervals
    seed: int = 0
    global_batch_size: int = 256
    per_device_batch: int | None = None
    resume: str | None = None  # None, "latest", "auto" or a checkpoint path
    allow_inexact_resume: bool = False  # resume although the continuation cannot equal an uninterrupted run
    optim: OptimSpec = field(default_factory=OptimSpec)
    held_out: HeldOutSpec = field(default_factory=HeldOutSpec)
    samples: SampleSpec = field(default_factory=SampleSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    flags: dict[str, Any] = field(default_factory=dict)  # as given; recorded in train_config.yaml and trackers


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Validate the parsed flags (:func:`validate_args`) and turn them into :class:`TrainSettings`.

    Raises:
        ConfigError: a bad flag or flag combination.
    """
    validate_args(args)
    classes = tuple(int(c) for c in str(args.sample_classes).split(",")) if args.sample_classes else None
    return TrainSettings(
        output_dir=Path(args.output_dir),
        data=DataSpec(args.data_dir, args.dataset, args.dataset_split, args.image_column, args.label_column,
                      args.latents_dir, args.resolution, args.vae, args.vae_subfolder, args.random_flip,
                      args.num_workers),
        model=ModelSpec(args.model, parse_model_kwargs(args.model_kwargs), args.decay_mode, args.alpha,
                        args.attention_backend),
        intervals=Intervals(args.max_steps, args.log_every, args.checkpoint_every, args.keep_checkpoints,
                            args.export_every, args.eval_every, args.sample_every),
        seed=args.seed,
        global_batch_size=args.global_batch_size,
        per_device_batch=args.per_device_batch,
        resume=args.resume,
        allow_inexact_resume=bool(args.allow_inexact_resume),
        optim=OptimSpec(args.learning_rate, args.weight_decay, args.ema_decay, args.max_grad_norm),
        held_out=HeldOutSpec(args.eval_data_dir, args.eval_max_samples),
        samples=SampleSpec(args.sample_steps, args.sample_guidance_scale, classes),
        runtime=RuntimeSpec(bool(args.cpu), args.mixed_precision, bool(args.compile), bool(args.allow_tf32),
                            bool(args.gradient_checkpointing), args.report_to, args.tracker_project,
                            bool(args.progress_bar)),
        flags=dict(vars(args)),
    )
