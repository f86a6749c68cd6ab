"""The settings every training task shares, declared once, and their static checks.

A task's settings class (``trainer.DiffusionSettings``, ``classifier_config.ClassifierSettings``) is
:class:`Settings` plus the groups of its own; each group is a frozen dataclass whose fields are flags
(:func:`~.flags.flag`).  Fields without a default in code (the learning rate, the batch, the EMA decay, ...)
take it from the task's packaged recipe (``recipes/sdt-p.yaml``, ``recipes/sdt-h.yaml``), where each value's
source (paper, DiT, RMT) is written beside it.

:func:`check_settings` checks the shared flags without touching data, models or devices; each task checks its
own groups, and the engine checks the rest (batch split, data, resume point) before any compute starts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from ..data import (
    AUTO_VERIFY_LIMIT,
    DATASET_HELP,
    MAX_RESOLUTION,
    VERIFY_IMAGES,
    is_visible,
    parse_data_files,
    refuse_streaming,
)
from ..hub import check_hub_flags
from ..utils.errors import ConfigError
from ..utils.runtime import MAX_NUM_WORKERS
from .flags import CALLER, COMMAND_LINE, EXPLICIT, flag, plain, settings_from_namespace

__all__ = [
    "ACCELERATE_MIXED_PRECISION",
    "MAX_GLOBAL_BATCH",
    "MAX_RESOLUTION",
    "MAX_SEED",
    "MIXED_PRECISION",
    "REPORT_TO",
    "STREAMING_REASON",
    "CheckpointSettings",
    "ConfigError",
    "DataSettings",
    "HubSettings",
    "InitSettings",
    "LogSettings",
    "MixedPrecision",
    "ModelSettings",
    "OptimSettings",
    "RunSettings",
    "Settings",
    "check_finite",
    "check_init_flags",
    "check_output_outside_data",
    "check_data_flags",
    "check_positive",
    "check_settings",
    "parse_model_kwargs",
    "read_as_data",
    "resolve_mixed_precision",
    "settings_from_flags",
]

REPORT_TO = ("auto", "tensorboard", "wandb", "all", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
# How `accelerate launch` (its --mixed_precision, or the config file's mixed_precision, FSDP's included) tells the
# processes its choice; accelerate launch sets it to "no" also when nothing was chosen.
ACCELERATE_MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"
MAX_SEED = 2**31 - 1  # numpy's global seed must stay below 2**32 after accelerate adds the process index
# A global batch above this is a typo: ImageNet has 1.28M images, DiT trains with 256; with a small
# --per-device-batch a batch of 10**12 would make one optimizer step last forever (a stop signal waits for it).
MAX_GLOBAL_BATCH = 1 << 20
HIDDEN = "<hidden>"  # what train_config.yaml and the trackers record for a --hub-token
RESUME_HELP = "'latest' (newest checkpoint in --output-dir, error if none), 'auto' (latest if any) or a path"
# Why the trainers refuse --streaming (docs/training.md, "Datasets through load_dataset").
STREAMING_REASON = ("exact resume and the seeded per-epoch order (EpochSampler) need a map-style dataset of known "
                    "length, and a stream's position is not restored exactly")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    title: ClassVar[str] = "run"
    output_dir: str | None = flag(None, "checkpoints, logs, metrics and the export (required)")
    max_steps: int | None = flag(help="optimizer steps")
    global_batch_size: int = flag(help="images per optimizer step over all processes")
    per_device_batch: int | None = flag(None, "micro-batch per process; default global/processes (gradient "
                                              "accumulation fills the rest)")
    seed: int = flag(0, f"in [0, {MAX_SEED}]; sets the data order and every random draw")
    cpu: bool = flag(False, "train on CPU even if a GPU is present")


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    title: ClassVar[str] = "model"
    model: str = flag(help="preset")
    model_kwargs: str | None = flag(None, "JSON object of the preset's model arguments to override, "
                                          "e.g. '{\"num_layers\": 2}'")
    alpha: float | None = flag(None, "override the CDSF scale alpha")
    attention_backend: str | None = flag(None, "override the attention backend")


@dataclass(frozen=True, kw_only=True)
class InitSettings:
    """Fine-tuning: a new run that starts from trained weights (:mod:`.init_from`, docs/training.md)."""

    title: ClassVar[str] = "model initialisation (fine-tuning)"
    init_from: str | None = flag(None, "start a new run (step 0, fresh optimiser and EMA) from these weights: a "
                                       "pipeline, checkpoint or model folder, or a Hub id; a --resume that finds a "
                                       "checkpoint wins over it", metavar="PATH_OR_HUB_ID")
    init_from_ema: bool = flag(False, "with a checkpoint --init-from: start from its EMA weights, not its online "
                                      "weights")
    strict_classes: bool = flag(False, "refuse an --init-from whose classes differ from the data's instead of "
                                       "resizing its class rows (a classifier: instead of a new head)")


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    title: ClassVar[str] = "data"
    data_dir: str | None = flag(None, "training image folder, one sub-folder per class")
    dataset: str | None = flag(None, "training data: " + DATASET_HELP["dataset"])
    dataset_config: str | None = flag(None, DATASET_HELP["dataset_config"])
    dataset_split: str = flag("train", DATASET_HELP["dataset_split"])
    data_files: str | None = flag(None, DATASET_HELP["data_files"])
    image_column: str = flag("image", DATASET_HELP["image_column"])
    label_column: str = flag("label", DATASET_HELP["label_column"])
    streaming: bool = flag(False, DATASET_HELP["streaming"])
    eval_data_dir: str | None = flag(None, "held-out image folder with the training classes")
    resolution: int | None = flag(help="image side")
    num_workers: int = flag(help="data-loader worker processes per process")
    verify_images: str = flag("auto", f"decode every training image before training, naming the unreadable ones "
                                      f"('auto': when there are at most {AUTO_VERIFY_LIMIT})", choices=VERIFY_IMAGES)


@dataclass(frozen=True, kw_only=True)
class OptimSettings:
    title: ClassVar[str] = "optimisation"
    learning_rate: float = flag(help="AdamW learning rate")
    weight_decay: float = flag(help="AdamW weight decay")
    ema_decay: float = flag(help="decay of the EMA of the weights, per step from the first")
    max_grad_norm: float | None = flag(help="gradient clipping (default: none)")
    mixed_precision: str | None = flag(None, "wins over accelerate launch's --mixed_precision / config file, which "
                                             "wins over a --config or recipe value; default: accelerate's choice, "
                                             "else no", choices=MIXED_PRECISION)
    allow_tf32: bool = flag(False, "TF32 matmuls/convolutions on Ampere+")
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass")
    compile: bool = flag(False, "torch.compile the model (inductor)")


@dataclass(frozen=True, kw_only=True)
class CheckpointSettings:
    title: ClassVar[str] = "checkpoints and resuming"
    checkpoint_every: int | None = flag(help="steps between checkpoints")
    keep_checkpoints: int = flag(3, "newest checkpoints kept; 0 keeps all")
    resume: str | None = flag(None, RESUME_HELP)
    overwrite: bool = flag(False, "start afresh in an --output-dir that holds an earlier run: its checkpoints, "
                                  "metrics.jsonl and export are deleted first")
    allow_inexact_resume: bool = flag(False, "resume even where the continuation cannot equal an uninterrupted run "
                                             "(another --seed, batch layout, training data or transform, a missing "
                                             "RNG state); the log and metrics.jsonl say so")


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    title: ClassVar[str] = "logging"
    report_to: str = flag("auto", "trackers; 'auto': tensorboard if it is installed, else none (one log line "
                                  "says which)", choices=REPORT_TO)
    tracker_project: str = flag("sdt-diffusion", "tracker project name")
    log_every: int = flag(10, "steps per metrics line / tracker point")
    progress_bar: bool = flag(True, "a progress bar on the main process", negative="--no-progress-bar")


@dataclass(frozen=True, kw_only=True)
class HubSettings:
    """Upload of the export to the Hugging Face Hub (the trainers and ``sdt-export``)."""

    title: ClassVar[str] = "Hugging Face Hub"
    push_to_hub: bool = flag(False, "upload the final export (with its model card) to --hub-model-id on the main "
                                    "process once the run has finished")
    hub_model_id: str | None = flag(None, "the Hub repository, e.g. your-name/sdt-p-xl2 (created if missing; the "
                                          "model card's load snippet names it)")
    hub_private: bool = flag(False, "create the repository private (an existing one keeps its visibility)")
    hub_token: str | None = flag(None, "Hub token (default: the HF_TOKEN environment variable or the saved login; "
                                       "never logged or recorded)")
    hub_license: str | None = flag(None, "license id for the model card, e.g. apache-2.0 (default: none stated)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What every training task is configured by; a task's settings class adds its own groups."""

    run: RunSettings
    model: ModelSettings
    init: InitSettings = field(default_factory=InitSettings)  # off unless asked for
    data: DataSettings
    optim: OptimSettings
    checkpoints: CheckpointSettings
    logging: LogSettings
    hub: HubSettings = field(default_factory=HubSettings)  # off unless asked for
    flags: dict[str, Any] = field(default_factory=dict)  # as given; recorded in train_config.yaml and trackers
    sources: dict[str, str] = field(default_factory=dict)  # where each flag came from (flags.FlagNamespace)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def values(self) -> dict[str, Any]:
        """Every flag's value by its name (the groups flattened)."""
        return {f.name: getattr(group, f.name) for group in vars(self).values() if hasattr(group, "title")
                for f in fields(group)}

    def record(self) -> dict[str, Any]:
        """The flags as plain YAML/JSON values (``train_config.yaml``, trackers); a ``--hub-token`` is hidden."""
        record = plain(self.flags or self.values())
        if record.get("hub_token"):
            record["hub_token"] = HIDDEN
        return record

    def source(self, name: str) -> str:
        """Where flag ``name``'s value came from (:data:`~.flags.COMMAND_LINE`, ``--config FILE``, ``recipe NAME``,
        :data:`~.flags.DEFAULT`); :data:`~.flags.CALLER` for settings built without parsing."""
        return self.sources.get(name, CALLER)


@dataclass(frozen=True)
class MixedPrecision:
    """The mixed precision a run uses, where it came from, and what gave way to it."""

    value: str  # given to the Accelerator
    source: str  # "--mixed-precision on the command line", "accelerate launch", "--config FILE", "recipe NAME", ...
    note: str = ""  # a --config, recipe or default value that gave way to accelerate launch's choice (logged)
    warning: str = ""  # --mixed-precision overrode accelerate launch's choice (logged as a warning)


def resolve_mixed_precision(value: str | None, source: str, environ: Mapping[str, str] | None = None
                            ) -> MixedPrecision:
    """The mixed precision of a run whose ``--mixed-precision`` is ``value`` from ``source``: an explicit flag
    (:data:`~.flags.EXPLICIT`) wins; else accelerate launch's choice (``ACCELERATE_MIXED_PRECISION``, which
    ``accelerate launch`` sets from its ``--mixed_precision`` or its config file, FSDP's included); else the
    ``--config`` / recipe value; else ``no``.  ``accelerate launch`` sets ``no`` also when nothing was chosen, so
    ``no`` there is not a choice that overrides a YAML value (``--mixed-precision no`` is).
    """
    environ = os.environ if environ is None else environ
    launched = (environ.get(ACCELERATE_MIXED_PRECISION) or "").strip().lower()
    chosen = launched if launched not in ("", "no") else ""
    if value is not None and source in EXPLICIT:
        where = "--mixed-precision on the command line" if source == COMMAND_LINE else f"the {source}'s settings"
        warning = (f"--mixed-precision {value} ({source}) wins over accelerate launch's mixed precision {chosen} "
                   f"({ACCELERATE_MIXED_PRECISION}={chosen})" if chosen and chosen != value else "")
        return MixedPrecision(value, where, warning=warning)
    if chosen:
        note = f"{source}'s {value} gives way to it" if value is not None and value != chosen else ""
        return MixedPrecision(chosen, "accelerate launch", note=note)
    if value is not None:
        return MixedPrecision(value, source)
    return MixedPrecision("no", "accelerate launch" if launched else "default")


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


def check_positive(values: dict[str, Any], names: tuple[str, ...], allow_zero: bool = False) -> None:
    """Each named count is ``> 0`` (``>= 0`` with ``allow_zero``) where given."""
    for name in names:
        value = values[name]
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_finite(values: dict[str, Any], names: tuple[str, ...]) -> None:
    """Each named number is finite where given."""
    for name in names:
        value = values[name]
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be finite, got {value}")


def settings_from_flags(settings_class: type, args: Any, check: Callable[[Any], None]) -> Any:
    """``settings_class`` from parsed flags, checked by :func:`check_settings` and the task's ``check``.

    Raises:
        ConfigError: a bad flag or flag combination.
    """
    settings = settings_from_namespace(settings_class, args, flags=dict(vars(args)),
                                       sources=dict(getattr(args, "sources", None) or {}))
    check_settings(settings)
    check(settings)
    return settings


def read_as_data(path: str | Path, folder: str | Path) -> bool:
    """Whether the image-folder reader of ``folder`` would read ``path``: ``path`` is ``folder`` or lies below it
    through visible names only (links resolved; a hidden ``.runs/`` is skipped by the reader)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    if path != folder and folder not in path.parents:
        return False
    return all(is_visible(part) for part in path.relative_to(folder).parts)


def check_output_outside_data(output_flag: str, output: str | None, folders: dict[str, str | None]) -> None:
    """The output folder must not be (or lie inside) an image folder the command reads: the next run would read
    its files (sample grids, a lock folder, cache shards) as images of a class, or as a class of their own.

    Raises:
        ConfigError: naming both flags.
    """
    for flag_name, folder in folders.items():
        if output and folder and read_as_data(output, folder):
            raise ConfigError(f"{output_flag} {output} lies inside {flag_name} {folder}: what is written there "
                              f"(sample grids, checkpoints, cache shards) would be read as images or classes of the "
                              f"data by the next run; choose an {output_flag} outside the data")


def check_data_flags(v: dict[str, Any]) -> None:
    """The ``load_dataset`` flags: ``--dataset-config`` and ``--data-files`` only with ``--dataset``, a readable
    ``--data-files``, and ``--streaming`` refused (:data:`STREAMING_REASON`).  Whether the dataset loads is the
    plan's check (it reads the data, still before any compute).

    Raises:
        ConfigError: naming the flag and its value.
    """
    refuse_streaming(v["streaming"], STREAMING_REASON)  # a DataInputError is a ConfigError
    for flag_name, key in (("--dataset-config", "dataset_config"), ("--data-files", "data_files")):
        if v[key] and not v["dataset"]:
            raise ConfigError(f"{flag_name} {v[key]!r} needs --dataset (it is load_dataset's argument)")
    parse_data_files(v["data_files"])


def check_settings(settings: Settings) -> None:
    """Check the shared flags and their combinations without touching data, models or devices.

    Raises:
        ConfigError: naming the flags at fault.
    """
    v = settings.values()
    if not v["output_dir"]:
        raise ConfigError("--output-dir is required")
    for flag_name, value in (("--data-dir", v["data_dir"]), ("--eval-data-dir", v["eval_data_dir"])):
        if value and not Path(value).is_dir():
            raise ConfigError(f"{flag_name} {value}: not a directory")
    check_data_flags(v)
    local_dataset = v["dataset"] if v["dataset"] and Path(v["dataset"]).is_dir() else None
    check_output_outside_data("--output-dir", v["output_dir"], {"--data-dir": v["data_dir"], "--dataset": local_dataset,
                                                               "--eval-data-dir": v["eval_data_dir"]})
    if v["data_dir"] and v["eval_data_dir"] and read_as_data(v["eval_data_dir"], v["data_dir"]):
        raise ConfigError(f"--eval-data-dir {v['eval_data_dir']} holds training images (it is, or lies inside, "
                          f"--data-dir {v['data_dir']}): the held-out numbers would be measured on images the model "
                          f"trains on; give a folder of other images (or no --eval-data-dir)")
    parse_model_kwargs(v["model_kwargs"])
    check_positive(v, ("max_steps", "global_batch_size", "per_device_batch", "resolution", "checkpoint_every",
                       "log_every"))
    check_positive(v, ("keep_checkpoints", "num_workers"), allow_zero=True)
    if v["num_workers"] > MAX_NUM_WORKERS:
        raise ConfigError(f"--num-workers must lie in [0, {MAX_NUM_WORKERS}], got {v['num_workers']}")
    if v["resolution"] is not None and v["resolution"] > MAX_RESOLUTION:
        raise ConfigError(f"--resolution must lie in [1, {MAX_RESOLUTION}], got {v['resolution']}")
    if v["global_batch_size"] > MAX_GLOBAL_BATCH:
        raise ConfigError(f"--global-batch-size must lie in [1, {MAX_GLOBAL_BATCH}], got {v['global_batch_size']}")
    check_finite(v, ("learning_rate", "weight_decay", "ema_decay", "max_grad_norm", "alpha"))
    if v["learning_rate"] <= 0:
        raise ConfigError(f"--learning-rate must be > 0, got {v['learning_rate']}")
    if v["weight_decay"] < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {v['weight_decay']}")
    if not 0.0 <= v["ema_decay"] < 1.0:
        raise ConfigError(f"--ema-decay must lie in [0, 1), got {v['ema_decay']}")
    if v["max_grad_norm"] is not None and v["max_grad_norm"] <= 0:
        raise ConfigError(f"--max-grad-norm must be > 0, got {v['max_grad_norm']}")
    if v["alpha"] is not None and v["alpha"] < 0:
        raise ConfigError(f"--alpha must be >= 0, got {v['alpha']}")
    if not 0 <= v["seed"] <= MAX_SEED:
        raise ConfigError(f"--seed must lie in [0, {MAX_SEED}], got {v['seed']}")
    if v["per_device_batch"] is not None and v["per_device_batch"] > v["global_batch_size"]:
        raise ConfigError(f"--per-device-batch {v['per_device_batch']} exceeds --global-batch-size "
                          f"{v['global_batch_size']}")
    if v["overwrite"] and v["resume"] is not None:
        raise ConfigError(f"--overwrite contradicts --resume {v['resume']}: pass one of them")
    if v["resume"] not in (None, "latest", "auto") and not Path(v["resume"]).is_dir():
        raise ConfigError(f"--resume {v['resume']}: not a checkpoint directory (or pass 'latest' / 'auto')")
    check_hub_flags(v["push_to_hub"], v["hub_model_id"], v["hub_token"])
    check_init_flags(settings.init)


def check_init_flags(init: InitSettings) -> None:
    """``--init-from-ema`` and ``--strict-classes`` need ``--init-from`` (the source itself is opened by the task's
    plan, before any compute).

    Raises:
        ConfigError: naming the flag.
    """
    for name, on in (("--init-from-ema", init.init_from_ema), ("--strict-classes", init.strict_classes)):
        if on and not init.init_from:
            raise ConfigError(f"{name} applies to --init-from, which is not given")
    if init.init_from is not None and not str(init.init_from).strip():
        raise ConfigError("--init-from is empty: give a pipeline, checkpoint or model folder, or a Hub id")
