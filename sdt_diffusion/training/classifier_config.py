"""Flags of the classification trainer (``training/train_classifier.py``, ``sdt-train-classifier``): the shared
ones (:mod:`.config`) plus those of SDT-H on ImageNet, with the paper's recipe in ``recipes/sdt-h.yaml`` and the
three sizes in ``recipes/sdt-h-{t,s,b}.yaml``.

The recipe is what SDT-H's paper states (AdamW, lr 1e-3 at batch 1024, weight decay 0.05, cosine, RandAugment,
Mixup, CutMix, random erasing, stochastic depth 0.1 / 0.15 / 0.4 for T / S / B) completed, where the paper is
silent ("same protocol as RMT"), with RMT's released training code; the recipe file names the source of every
value.  A YAML ``--config`` works as in ``training/train.py``.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..attention.modes import decay_mode as get_decay_mode
from ..data import AUTO_VERIFY_LIMIT
from ..models.sdt_h import SDT_H_PRESETS, SDTH
from ..utils.cli_args import add_deprecated_alias
from ..utils.errors import ConfigError
from ..utils.runtime import MAX_PER_DEVICE_BATCH
from .config import Settings, check_finite, check_positive, parse_model_kwargs, settings_from_flags
from .flags import build_parser as build_flag_parser
from .flags import flag, parse_flags

__all__ = [
    "AUTO_VERIFY_LIMIT",
    "EXPORT_WEIGHTS",
    "MAX_RECOUNT",
    "MAX_REPEATED_AUG",
    "RECIPE",
    "AugmentSpec",
    "ClassifierSettings",
    "build_parser",
    "model_overrides",
    "parse_args",
    "parse_decay_modes",
    "parse_pair",
    "scaled_learning_rate",
    "settings_from_args",
]

RECIPE = "sdt-h"  # recipes/sdt-h.yaml: the defaults
HELPS = {  # what the shared flags mean here
    "model": "SDT-H preset: SDT-H-T, SDT-H-S or SDT-H-B",
    "model_kwargs": "JSON object of SDT-H arguments overriding the preset, e.g. '{\"depths\": [1, 1, 2, 1]}'",
    "max_steps": "optimizer steps (default: --epochs of them)",
    "resolution": "training crop and evaluation centre crop",
    "eval_data_dir": "validation image folder (the training class folders)",
    "verify_images": f"decode every training and validation image before training, naming the unreadable ones "
                     f"('auto': when there are at most {AUTO_VERIFY_LIMIT})",
    "learning_rate": "peak lr at --lr-base-batch (scaled linearly with --global-batch-size)",
    "checkpoint_every": "steps between checkpoints (default: once per epoch)",
}
EXPORT_WEIGHTS = ("best", "ema", "online")
# Typo bounds, checked before anything is allocated: every epoch's key list holds --repeated-aug copies of the
# data (DeiT and RMT use 3), and random erasing draws up to --recount boxes per image (timm's default is 1).
MAX_REPEATED_AUG = 16
MAX_RECOUNT = 100


def parse_pair(flag_name: str, value: str) -> tuple[float, float]:
    """``"a,b"`` as two finite floats with ``0 < a <= b``."""
    try:
        low, high = (float(v) for v in str(value).split(","))
    except ValueError:
        raise ConfigError(f"{flag_name} must be two comma-separated numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ConfigError(f"{flag_name} must satisfy 0 < low <= high, got {value!r}")
    return low, high


def _pair(text: str) -> tuple[float, float]:
    try:
        return parse_pair("the range", text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _policy(text: str) -> str | None:
    return None if text.lower() == "none" else text


@dataclass(frozen=True, kw_only=True)
class SDTHModelSettings:
    title: ClassVar[str] = "SDT-H model"
    decay_mode: str | None = flag(None, "decay mode of every stage (none, fixed, 1d, bidirectional, decomposed, "
                                        "cdsf), or one per stage, comma-separated (e.g. "
                                        "decomposed,decomposed,fixed,fixed; default: the preset's, decomposed in "
                                        "stages 1-2 and cdsf in 3-4)")
    drop_path: float | None = flag(None, "stochastic depth (default: the preset's)")


@dataclass(frozen=True, kw_only=True)
class ClassDataSettings:
    title: ClassVar[str] = "classification data"
    eval_dataset: str | None = flag(None, "validation data like --dataset (instead of --eval-data-dir); "
                                          "--dataset-config and --data-files apply when it is --dataset itself")
    eval_dataset_split: str = flag("validation", "split of --eval-dataset")


@dataclass(frozen=True, kw_only=True)
class AugmentSpec:
    """timm's training transform, Mixup/CutMix, label smoothing and repeated augmentation."""

    title: ClassVar[str] = "augmentation (timm)"
    auto_augment: str | None = flag(help="RandAugment policy ('none': off)", name="--aa", parse=_policy)
    color_jitter: float = flag(help="colour jitter (timm applies it only without RandAugment)")
    scale: tuple[float, float] = flag(help="random-resized-crop area range", parse=_pair, metavar="LOW,HIGH")
    ratio: tuple[float, float] = flag(help="random-resized-crop aspect range", parse=_pair, metavar="LOW,HIGH")
    hflip: float = flag(help="horizontal flip probability")
    interpolation: str = flag(help="resize interpolation", choices=("bicubic", "bilinear"))
    reprob: float = flag(help="random erasing probability")
    remode: str = flag(help="random erasing fill", choices=("pixel", "rand", "const"))
    recount: int = flag(help="random erasing boxes")
    mixup: float = flag(help="mixup alpha (0: off)")
    cutmix: float = flag(help="cutmix alpha (0: off)")
    mixup_prob: float = flag(help="probability of mixing a batch")
    mixup_switch_prob: float = flag(help="probability of cutmix instead of mixup")
    mixup_mode: str = flag(help="what is mixed alike", choices=("batch", "pair", "elem"))
    smoothing: float = flag(help="label smoothing")
    repeated_aug: int = flag(help="repeated augmentation: each image this many times per epoch, on different "
                                  "processes")

    @property
    def mixes(self) -> bool:
        """Whether Mixup/CutMix is on (then the targets are soft and the loss is soft-target cross-entropy)."""
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass(frozen=True, kw_only=True)
class ScheduleSettings:
    title: ClassVar[str] = "schedule (the learning rate is --learning-rate x --global-batch-size / --lr-base-batch)"
    epochs: int = flag(help="epochs (--max-steps overrides)")
    warmup_epochs: float = flag(help="linear warm-up epochs")
    lr_base_batch: int = flag(help="the global batch --learning-rate is given for")
    min_lr: float = flag(help="end of the cosine")
    warmup_lr: float = flag(help="start of the warm-up")
    adam_eps: float = flag(help="AdamW eps")


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    title: ClassVar[str] = "evaluation and export"
    eval_every_epochs: int = flag(1, "epochs between evaluations (0: only at the end)")
    eval_batch_size: int | None = flag(None, "per process (default: the training micro-batch)")
    eval_crop_pct: float = flag(help="evaluation resize = resolution / this")
    export_weights: str = flag("best", "exported at the end: the best evaluated of online/EMA (RMT's protocol), "
                                       "the EMA, or the online weights ('best' without evaluation data exports the "
                                       "EMA)", choices=EXPORT_WEIGHTS)


@dataclass(frozen=True, kw_only=True)
class ClassifierSettings(Settings):
    """Everything a classification run is configured by."""

    sdth: SDTHModelSettings
    classes: ClassDataSettings
    augment: AugmentSpec
    schedule: ScheduleSettings
    evaluation: EvalSettings


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``training/train_classifier.py``, its defaults from ``recipes/sdt-h.yaml``."""
    parser = build_flag_parser(ClassifierSettings, "train_classifier.py", "Train SDT-H on an image-classification "
                               "folder or dataset with the paper's ImageNet recipe (accelerate: one GPU, many GPUs or "
                               "nodes).", RECIPE, HELPS)
    add_deprecated_alias(parser, "--decay-modes", "--decay-mode")  # the diffusion trainer's name for it
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, with ``--config`` YAML values as defaults that command-line flags override."""
    return parse_flags(build_parser(), argv)


def parse_decay_modes(value: str | None, num_stages: int) -> tuple[str, ...] | None:
    """``--decay-mode``: one mode per stage, or one mode for all; each checked against the mode table."""
    if value is None:
        return None
    modes = [m.strip() for m in str(value).split(",")]
    if len(modes) == 1:
        modes = modes * num_stages
    if len(modes) != num_stages:
        raise ConfigError(f"--decay-mode needs one mode or {num_stages} (one per stage), got {len(modes)}: {value!r}")
    for i, mode in enumerate(modes):
        try:
            get_decay_mode(mode)
        except ValueError as e:
            raise ConfigError(f"--decay-mode stage {i + 1}: {e}") from None
    return tuple(modes)


def scaled_learning_rate(learning_rate: float, global_batch: int, base_batch: int) -> float:
    """The linear scaling rule: ``learning_rate x global_batch / base_batch``."""
    return learning_rate * global_batch / base_batch


def model_overrides(s: ClassifierSettings) -> dict[str, Any]:
    """``--model-kwargs`` with ``--decay-mode``, ``--alpha``, ``--drop-path`` and ``--attention-backend`` merged in.

    Raises:
        ConfigError: a flag contradicts ``--model-kwargs``.
    """
    kwargs = parse_model_kwargs(s.model.model_kwargs)
    stages = len(kwargs.get("embed_dims", SDT_H_PRESETS[s.model.model]["embed_dims"]))
    flags = {"decay_modes": ("--decay-mode", parse_decay_modes(s.sdth.decay_mode, stages)),
             "alpha": ("--alpha", s.model.alpha), "drop_path_rate": ("--drop-path", s.sdth.drop_path),
             "attention_backend": ("--attention-backend", s.model.attention_backend)}
    for key, (flag_name, value) in flags.items():
        if value is None:
            continue
        given = kwargs.get(key)
        if given is not None and (tuple(given) if isinstance(given, list) else given) != value:
            raise ConfigError(f"{flag_name} {value!r} contradicts --model-kwargs {key}={given!r}")
        kwargs[key] = value
    return kwargs


def _check_sources(s: ClassifierSettings) -> None:
    """One training source, at most one validation source."""
    if s.data.data_dir and s.data.dataset:
        raise ConfigError("pass one of --data-dir and --dataset, not both")
    if not (s.data.data_dir or s.data.dataset):
        raise ConfigError("pass --data-dir (an image folder) or --dataset (a save_to_disk folder, a Hub id or data "
                          "files for load_dataset)")
    if s.data.eval_data_dir and s.classes.eval_dataset:
        raise ConfigError("pass one of --eval-data-dir and --eval-dataset, not both")


def check_classifier(s: ClassifierSettings) -> None:
    """Check the classification flags and their combinations without touching data, models or devices.

    Raises:
        ConfigError: naming the flags at fault.
    """
    _check_sources(s)
    if s.model.model not in SDT_H_PRESETS:
        raise ConfigError(f"--model {s.model.model!r} is not an SDT-H preset; choose one of {sorted(SDT_H_PRESETS)}")
    kwargs = parse_model_kwargs(s.model.model_kwargs)
    fields = set(inspect.signature(SDTH.__init__).parameters) - {"self"}
    bad = sorted(k for k in kwargs if k not in fields)
    if bad:
        raise ConfigError(f"--model-kwargs: unknown SDT-H arguments {bad}; valid: {sorted(fields)}")
    if "num_labels" in kwargs:
        raise ConfigError("--model-kwargs num_labels: the number of classes comes from the data")
    v = s.values()
    if v["resolution"] is None:
        raise ConfigError("--resolution is required")
    check_positive(v, ("epochs", "lr_base_batch", "eval_batch_size", "repeated_aug", "recount"))
    for name, bound in (("repeated_aug", MAX_REPEATED_AUG), ("recount", MAX_RECOUNT),
                        ("eval_batch_size", MAX_PER_DEVICE_BATCH)):
        if v[name] is not None and v[name] > bound:  # --eval-batch-size: None is the training micro-batch
            raise ConfigError(f"--{name.replace('_', '-')} must lie in [1, {bound}], got {v[name]}")
    check_positive(v, ("eval_every_epochs", "warmup_epochs"), allow_zero=True)
    check_finite(v, ("min_lr", "warmup_lr", "adam_eps", "drop_path", "color_jitter", "mixup", "cutmix", "smoothing",
                     "warmup_epochs"))
    if v["adam_eps"] <= 0:
        raise ConfigError(f"--adam-eps must be > 0, got {v['adam_eps']}")
    for name in ("min_lr", "warmup_lr", "color_jitter", "mixup", "cutmix"):
        if v[name] < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {v[name]}")
    if v["drop_path"] is not None and not 0.0 <= v["drop_path"] < 1.0:
        raise ConfigError(f"--drop-path must lie in [0, 1), got {v['drop_path']}")
    for name in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "smoothing"):
        if not (math.isfinite(v[name]) and 0.0 <= v[name] <= 1.0):
            raise ConfigError(f"--{name.replace('_', '-')} must lie in [0, 1], got {v[name]}")
    if not 0 < v["eval_crop_pct"] <= 1:
        raise ConfigError(f"--eval-crop-pct must lie in (0, 1], got {v['eval_crop_pct']}")
    model_overrides(s)


def settings_from_args(args: argparse.Namespace) -> ClassifierSettings:
    """Check the parsed flags and turn them into :class:`ClassifierSettings`.

    Raises:
        ConfigError: a bad flag or flag combination.
    """
    return settings_from_flags(ClassifierSettings, args, check_classifier)
