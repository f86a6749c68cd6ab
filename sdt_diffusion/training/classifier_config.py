"""Flags of ``training/train_classifier.py`` (SDT-H on ImageNet with the paper's recipe) and their static checks.

Defaults are the recipe SDT-H's paper states (AdamW, lr 1e-3 at batch 1024, weight decay 0.05, cosine,
RandAugment, Mixup, CutMix, random erasing, stochastic depth 0.1 / 0.15 / 0.4 for T / S / B) completed, where
the paper is silent ("same protocol as RMT"), with RMT's released training code: 300 epochs, 5 warm-up epochs
from 1e-6, cosine to 1e-5, AdamW eps 1e-8 with biases and 1-D parameters excluded from weight decay, linear lr
scaling with the batch, ``rand-m9-mstd0.5-inc1``, colour jitter 0.4, random erasing 0.25 (per pixel), mixup 0.8,
cutmix 1.0 (switch probability 0.5), label smoothing 0.1, repeated augmentation x3, EMA 0.99996, bicubic
224 random-resized crops with horizontal flips, no gradient clipping.  :data:`RECIPE` lists them with their
source (``docs/training_sdt_h.md`` prints it as a table).

Flags that mean what they mean in ``training/train.py`` keep its names (``--model``, ``--model-kwargs``,
``--data-dir``, ``--eval-data-dir``, ``--resolution``, ``--output-dir``, ``--max-steps``,
``--global-batch-size``, ``--learning-rate``, ``--seed``, ``--num-workers``, ``--report-to``, ``--resume``,
``--checkpoint-every`` ...) and a YAML ``--config`` works the same way.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attention.modes import decay_mode as get_decay_mode
from ..models.sdt_h import SDT_H_PRESETS, SDTH
from .config import (
    MAX_SEED,
    MIXED_PRECISION,
    REPORT_TO,
    ConfigError,
    HelpFormatter,
    RuntimeSpec,
    load_yaml_config,
    parse_model_kwargs,
)

__all__ = [
    "AUTO_VERIFY_LIMIT",
    "EXPORT_WEIGHTS",
    "RECIPE",
    "AugmentSpec",
    "ClassifierSettings",
    "RecipeSpec",
    "build_parser",
    "model_overrides",
    "parse_args",
    "parse_decay_modes",
    "parse_pair",
    "recipe_table",
    "scaled_learning_rate",
    "settings_from_args",
    "validate_args",
]

EXPORT_WEIGHTS = ("best", "ema", "online")
VERIFY_IMAGES = ("auto", "all", "none")
# ``--verify-images auto`` decodes every image before training when train + eval hold at most this many.
AUTO_VERIFY_LIMIT = 20_000

# (what, value, source) of every recipe default; docs/training_sdt_h.md shows this table.
RECIPE: list[tuple[str, str, str]] = [
    ("optimizer", "AdamW, betas (0.9, 0.999), eps 1e-8", "paper (AdamW); RMT (eps)"),
    ("learning rate", "1e-3 at global batch 1024, scaled linearly (`lr x batch / 1024`)", "paper; RMT's scaling rule"),
    ("weight decay", "0.05; biases, 1-D parameters and layer scales excluded", "paper; RMT"),
    ("schedule", "300 epochs, 5 linear warm-up epochs from 1e-6, cosine to 1e-5, per step", "paper (cosine); RMT"),
    ("stochastic depth", "0.1 / 0.15 / 0.4 (T / S / B), linear in depth", "paper"),
    ("crops", "RandomResizedCrop 224, scale (0.08, 1), ratio (3/4, 4/3), bicubic; horizontal flip 0.5", "RMT"),
    ("RandAugment", "`rand-m9-mstd0.5-inc1`", "paper (RandAugment); RMT (policy)"),
    ("colour jitter", "0.4 (timm applies it only without RandAugment, as in RMT's runs)", "RMT"),
    ("random erasing", "probability 0.25, per-pixel noise, 1 box", "paper; RMT"),
    ("mixup / cutmix", "alpha 0.8 / 1.0, probability 1, switch probability 0.5, per batch", "paper; RMT"),
    ("label smoothing", "0.1", "RMT"),
    ("repeated augmentation", "x3 (each image thrice per epoch, on different processes)", "RMT"),
    ("EMA of the weights", "decay 0.99996 per step (parameters and BatchNorm statistics)", "RMT"),
    ("gradient clipping", "none", "RMT"),
    ("evaluation", "resize 256 bicubic -> centre crop 224, ImageNet mean/std; every epoch, online and EMA",
     "RMT"),
    ("reported number", "best epoch of max(online, EMA) top-1", "RMT"),
]


def recipe_table() -> str:
    """:data:`RECIPE` as a Markdown table."""
    rows = "".join(f"| {what} | {value} | {source} |\n" for what, value, source in RECIPE)
    return "| setting | default | source |\n|---|---|---|\n" + rows


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``training/train_classifier.py`` (one flat ``add_argument`` per flag, grouped as in
    ``--help``)."""
    p = argparse.ArgumentParser(
        prog="train_classifier.py",
        description="Train SDT-H on an image-classification folder or dataset with the paper's ImageNet recipe "
                    "(accelerate: one GPU, many GPUs or nodes).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", type=str, default=None,
                   help="YAML file of defaults (keys = flag names); command-line flags override it")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="SDT-H-T", choices=sorted(SDT_H_PRESETS), help="SDT-H preset")
    g.add_argument("--model-kwargs", type=str, default=None,
                   help='JSON object of SDT-H arguments overriding the preset, e.g. \'{"depths": [1, 1, 2, 1]}\'')
    g.add_argument("--decay-modes", type=str, default=None,
                   help="decay per stage, comma-separated (e.g. decomposed,decomposed,fixed,fixed), or one mode for "
                        "every stage: none, fixed, 1d, bidirectional, decomposed, cdsf (default: the preset's, "
                        "decomposed in stages 1-2 and cdsf in 3-4)")
    g.add_argument("--alpha", type=float, default=None, help="CDSF scale alpha (paper: 0.1)")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth (default: the preset's)")
    g.add_argument("--attention-backend", type=str, default=None, help="override the attention backend")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, default=None, help="training image folder, one sub-folder per class")
    g.add_argument("--dataset", type=str, default=None, help="training dataset saved with save_to_disk")
    g.add_argument("--dataset-split", type=str, default="train", help="split of a saved DatasetDict")
    g.add_argument("--eval-data-dir", type=str, default=None, help="validation image folder (same class folders)")
    g.add_argument("--eval-dataset", type=str, default=None, help="validation dataset saved with save_to_disk")
    g.add_argument("--eval-dataset-split", type=str, default="validation")
    g.add_argument("--image-column", type=str, default="image")
    g.add_argument("--label-column", type=str, default="label")
    g.add_argument("--resolution", type=int, default=224, help="training crop and evaluation centre crop")
    g.add_argument("--eval-crop-pct", type=float, default=0.875, help="evaluation resize = resolution / this")
    g.add_argument("--num-workers", type=int, default=8, help="data-loader worker processes per process")
    g.add_argument("--verify-images", type=str, default="auto", choices=VERIFY_IMAGES,
                   help=f"decode every image before training ('auto': when there are at most {AUTO_VERIFY_LIMIT})")

    g = p.add_argument_group("augmentation (timm)")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="RandAugment policy ('none': off)")
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--scale", type=str, default="0.08,1.0", help="random-resized-crop area range")
    g.add_argument("--ratio", type=str, default="0.75,1.3333333333", help="random-resized-crop aspect range")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--interpolation", type=str, default="bicubic", choices=("bicubic", "bilinear"))
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", type=str, default="pixel", choices=("pixel", "rand", "const"))
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", type=str, default="batch", choices=("batch", "pair", "elem"))
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--repeated-aug", type=int, default=3,
                   help="repeated augmentation: each image this many times per epoch, on different processes")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=str, default=None, help="checkpoints, logs, metrics, exported model")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--warmup-epochs", type=float, default=5.0)
    g.add_argument("--global-batch-size", type=int, default=1024)
    g.add_argument("--per-device-batch", type=int, default=None,
                   help="micro-batch per process; default global/processes (gradient accumulation fills the rest)")
    g.add_argument("--seed", type=int, default=0, help=f"in [0, {MAX_SEED}]")
    g.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, default=1e-3, help="peak lr at --lr-base-batch (scaled linearly)")
    g.add_argument("--lr-base-batch", type=int, default=1024, help="the global batch --learning-rate is given for")
    g.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="start of the warm-up")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (RMT: none)")
    g.add_argument("--ema-decay", type=float, default=0.99996)
    g.add_argument("--mixed-precision", type=str, default=None, choices=MIXED_PRECISION,
                   help="default: accelerate's config")
    g.add_argument("--allow-tf32", action="store_true", help="TF32 matmuls/convolutions on Ampere+")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")

    g = p.add_argument_group("evaluation, checkpoints and export")
    g.add_argument("--eval-every-epochs", type=int, default=1, help="epochs between evaluations (0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="per process (default: the training micro-batch)")
    g.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: an epoch)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept; 0 keeps all")
    g.add_argument("--resume", type=str, default=None,
                   help="'latest' (newest checkpoint in --output-dir, error if none), 'auto' (latest if any) or a path")
    g.add_argument("--allow-inexact-resume", action="store_true",
                   help="resume even where the continuation cannot equal an uninterrupted run (another --seed or "
                        "batch layout, a missing RNG state); the log and metrics.jsonl say so")
    g.add_argument("--export-weights", type=str, default="best", choices=EXPORT_WEIGHTS,
                   help="exported at the end: the best evaluated of online/EMA (RMT's protocol), the EMA, or the online "
                        "weights ('best' without evaluation data exports the EMA)")

    g = p.add_argument_group("logging")
    g.add_argument("--report-to", type=str, default="tensorboard", choices=REPORT_TO)
    g.add_argument("--tracker-project", type=str, default="sdt-diffusion")
    g.add_argument("--log-every", type=int, default=10, help="steps per metrics line / tracker point")
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=True)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, with ``--config`` YAML values as defaults that command-line flags override."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_yaml_config(pre.config, parser))
    return parser.parse_args(argv)


def parse_pair(flag: str, value: str) -> tuple[float, float]:
    """``"a,b"`` as two finite floats with ``0 < a <= b``."""
    try:
        low, high = (float(v) for v in str(value).split(","))
    except ValueError:
        raise ConfigError(f"{flag} must be two comma-separated numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ConfigError(f"{flag} must satisfy 0 < low <= high, got {value!r}")
    return low, high


def parse_decay_modes(value: str | None, num_stages: int) -> tuple[str, ...] | None:
    """``--decay-modes``: one mode per stage, or one mode for all; each checked against the mode table."""
    if value is None:
        return None
    modes = [m.strip() for m in str(value).split(",")]
    if len(modes) == 1:
        modes = modes * num_stages
    if len(modes) != num_stages:
        raise ConfigError(f"--decay-modes needs one mode or {num_stages} (one per stage), got {len(modes)}: {value!r}")
    for i, mode in enumerate(modes):
        try:
            get_decay_mode(mode)
        except ValueError as e:
            raise ConfigError(f"--decay-modes stage {i + 1}: {e}") from None
    return tuple(modes)


def scaled_learning_rate(learning_rate: float, global_batch: int, base_batch: int) -> float:
    """The linear scaling rule: ``learning_rate x global_batch / base_batch``."""
    return learning_rate * global_batch / base_batch


def _positive(args: argparse.Namespace, names: Sequence[str], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _probability(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")


def validate_args(args: argparse.Namespace) -> None:
    """Check flags and their combinations without touching data, models or devices.

    Raises:
        ConfigError: naming the flags at fault.
    """
    if not args.output_dir:
        raise ConfigError("--output-dir is required")
    for kind, (folder, saved) in {"training": (args.data_dir, args.dataset),
                                  "evaluation": (args.eval_data_dir, args.eval_dataset)}.items():
        flags = ("--data-dir", "--dataset") if kind == "training" else ("--eval-data-dir", "--eval-dataset")
        if folder and saved:
            raise ConfigError(f"pass one of {flags[0]} and {flags[1]}, not both")
        if kind == "training" and not (folder or saved):
            raise ConfigError("pass --data-dir (an image folder) or --dataset (a save_to_disk dataset)")
        for flag, value in zip(flags, (folder, saved)):
            if value and not Path(value).is_dir():
                raise ConfigError(f"{flag} {value}: not a directory")
    kwargs = parse_model_kwargs(args.model_kwargs)
    fields = set(inspect.signature(SDTH.__init__).parameters) - {"self"}
    bad = sorted(k for k in kwargs if k not in fields)
    if bad:
        raise ConfigError(f"--model-kwargs: unknown SDT-H arguments {bad}; valid: {sorted(fields)}")
    if "num_labels" in kwargs:
        raise ConfigError("--model-kwargs num_labels: the number of classes comes from the data")
    _positive(args, ("epochs", "max_steps", "global_batch_size", "per_device_batch", "resolution", "lr_base_batch",
                     "checkpoint_every", "log_every", "eval_batch_size", "repeated_aug", "recount"))
    _positive(args, ("keep_checkpoints", "num_workers", "eval_every_epochs", "warmup_epochs"), allow_zero=True)
    for name in ("learning_rate", "min_lr", "warmup_lr", "weight_decay", "adam_eps", "max_grad_norm", "ema_decay",
                 "alpha", "drop_path", "color_jitter", "mixup", "cutmix", "smoothing", "warmup_epochs"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be finite, got {value}")
    if args.learning_rate <= 0 or args.adam_eps <= 0:
        raise ConfigError(f"--learning-rate and --adam-eps must be > 0, got {args.learning_rate}, {args.adam_eps}")
    for name in ("min_lr", "warmup_lr", "weight_decay", "color_jitter", "mixup", "cutmix"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        raise ConfigError(f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ConfigError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if args.drop_path is not None and not 0.0 <= args.drop_path < 1.0:
        raise ConfigError(f"--drop-path must lie in [0, 1), got {args.drop_path}")
    if args.alpha is not None and args.alpha < 0:
        raise ConfigError(f"--alpha must be >= 0, got {args.alpha}")
    _probability(args, ("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "smoothing"))
    if not 0 < args.eval_crop_pct <= 1:
        raise ConfigError(f"--eval-crop-pct must lie in (0, 1], got {args.eval_crop_pct}")
    parse_pair("--scale", args.scale)
    parse_pair("--ratio", args.ratio)
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must lie in [0, {MAX_SEED}], got {args.seed}")
    if args.per_device_batch is not None and args.per_device_batch > args.global_batch_size:
        raise ConfigError(f"--per-device-batch {args.per_device_batch} exceeds --global-batch-size "
                          f"{args.global_batch_size}")
    if args.resume not in (None, "latest", "auto") and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume {args.resume}: not a checkpoint directory (or pass 'latest' / 'auto')")


@dataclass(frozen=True)
class AugmentSpec:
    """timm's training transform, Mixup/CutMix, label smoothing and repeated augmentation."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    repeated_aug: int = 3

    @property
    def mixes(self) -> bool:
        """Whether Mixup/CutMix is on (then the targets are soft and the loss is soft-target cross-entropy)."""
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass(frozen=True)
class RecipeSpec:
    """Schedule and optimiser (the lr is the one at ``lr_base_batch``; :func:`scaled_learning_rate` applies)."""

    epochs: int = 300
    max_steps: int | None = None
    warmup_epochs: float = 5.0
    learning_rate: float = 1e-3
    lr_base_batch: int = 1024
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    ema_decay: float = 0.99996


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything a classification run is configured by, as explicit values."""

    output_dir: Path
    preset: str = "SDT-H-T"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # SDT-H overrides (decay modes, alpha, ... merged in)
    data_dir: str | None = None
    dataset: str | None = None
    dataset_split: str = "train"
    eval_data_dir: str | None = None
    eval_dataset: str | None = None
    eval_dataset_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    resolution: int = 224
    eval_crop_pct: float = 0.875
    num_workers: int = 8
    verify_images: str = "auto"
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    recipe: RecipeSpec = field(default_factory=RecipeSpec)
    global_batch_size: int = 1024
    per_device_batch: int | None = None
    seed: int = 0
    eval_every_epochs: int = 1
    eval_batch_size: int | None = None
    checkpoint_every: int | None = None  # None: once per epoch
    keep_checkpoints: int = 3
    resume: str | None = None
    allow_inexact_resume: bool = False
    export_weights: str = "best"
    log_every: int = 10
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    flags: dict[str, Any] = field(default_factory=dict)  # as given; recorded in train_config.yaml and trackers


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-kwargs`` with ``--decay-modes``, ``--alpha``, ``--drop-path`` and ``--attention-backend`` merged in.

    Raises:
        ConfigError: a flag contradicts ``--model-kwargs``.
    """
    kwargs = parse_model_kwargs(args.model_kwargs)
    stages = len(kwargs.get("embed_dims", SDT_H_PRESETS[args.model]["embed_dims"]))
    flags = {"decay_modes": ("--decay-modes", parse_decay_modes(args.decay_modes, stages)),
             "alpha": ("--alpha", args.alpha), "drop_path_rate": ("--drop-path", args.drop_path),
             "attention_backend": ("--attention-backend", args.attention_backend)}
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        given = kwargs.get(key)
        if given is not None and (tuple(given) if isinstance(given, list) else given) != value:
            raise ConfigError(f"{flag} {value!r} contradicts --model-kwargs {key}={given!r}")
        kwargs[key] = value
    return kwargs


def settings_from_args(args: argparse.Namespace) -> ClassifierSettings:
    """Validate the parsed flags (:func:`validate_args`) and turn them into :class:`ClassifierSettings`.

    Raises:
        ConfigError: a bad flag or flag combination.
    """
    validate_args(args)
    augment = AugmentSpec(
        None if args.aa.lower() == "none" else args.aa, args.color_jitter, parse_pair("--scale", args.scale),
        parse_pair("--ratio", args.ratio), args.hflip, args.interpolation, args.reprob, args.remode, args.recount,
        args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.mixup_mode, args.smoothing,
        args.repeated_aug)
    recipe = RecipeSpec(args.epochs, args.max_steps, args.warmup_epochs, args.learning_rate, args.lr_base_batch,
                        args.min_lr, args.warmup_lr, args.weight_decay, args.adam_eps, args.max_grad_norm,
                        args.ema_decay)
    runtime = RuntimeSpec(bool(args.cpu), args.mixed_precision, bool(args.compile), bool(args.allow_tf32),
                          bool(args.gradient_checkpointing), args.report_to, args.tracker_project,
                          bool(args.progress_bar))
    return ClassifierSettings(
        output_dir=Path(args.output_dir), preset=args.model, model_kwargs=model_overrides(args),
        data_dir=args.data_dir, dataset=args.dataset, dataset_split=args.dataset_split,
        eval_data_dir=args.eval_data_dir, eval_dataset=args.eval_dataset, eval_dataset_split=args.eval_dataset_split,
        image_column=args.image_column, label_column=args.label_column, resolution=args.resolution,
        eval_crop_pct=args.eval_crop_pct, num_workers=args.num_workers, verify_images=args.verify_images,
        augment=augment, recipe=recipe, global_batch_size=args.global_batch_size,
        per_device_batch=args.per_device_batch, seed=args.seed, eval_every_epochs=args.eval_every_epochs,
        eval_batch_size=args.eval_batch_size, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, allow_inexact_resume=bool(args.allow_inexact_resume),
        export_weights=args.export_weights, log_every=args.log_every, runtime=runtime, flags=dict(vars(args)),
    )
