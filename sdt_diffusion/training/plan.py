"""Planning a run before any compute: the batch split, the data and its shapes, the model config, the resume point.

Everything here reads files and configs only (no weights are built), so a bad flag, an unreadable dataset or
a model that does not fit the data fails in seconds with a :class:`~.config.ConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.utils import gather_object
from diffusers import AutoencoderKL

from ..data import (
    EpochSampler,
    ImageClassDataset,
    LatentCacheDataset,
    class_names_to_id2label,
    load_image_source,
)
from ..models.dit import DiTTransformer2DModel
from ..models.registry import model_class_of, preset_config
from ..models.vae import vae_downsampling_factor, vae_scaling_factor
from ..utils.files import check_writable
from .checkpointing import check_checkpoint, read_done, read_rng_states, read_training_state, resolve_resume
from .config import ConfigError, DataSpec, ModelSpec, TrainSettings
from .export import default_sample_classes
from .state_files import RngState

__all__ = [
    "DEFAULT_RESOLUTION",
    "DEFAULT_VAE",
    "DataPlan",
    "RunPlan",
    "plan_batches",
    "plan_data",
    "plan_run",
    "resolve_model_config",
    "vae_config",
    "vae_reference",
]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_RESOLUTION = 256


def plan_batches(global_batch: int, per_device: int | None, num_processes: int) -> tuple[int, int]:
    """``(per_device_batch, grad_accum)`` with ``per_device · processes · accum = global_batch``.

    Raises:
        ConfigError: the global batch does not split evenly.
    """
    if per_device is None:
        if global_batch % num_processes:
            raise ConfigError(
                f"--global-batch-size {global_batch} is not divisible by the {num_processes} processes; "
                f"choose a multiple of {num_processes} (or set --per-device-batch)"
            )
        return global_batch // num_processes, 1
    if global_batch % (per_device * num_processes):
        raise ConfigError(
            f"--global-batch-size {global_batch} is not divisible by --per-device-batch {per_device} x "
            f"{num_processes} processes = {per_device * num_processes}"
        )
    return per_device, global_batch // (per_device * num_processes)


def resolve_model_config(spec: ModelSpec, in_channels: int, sample_size: int, num_classes: int) -> dict[str, Any]:
    """Preset + overrides, with ``in_channels``/``sample_size``/``num_embeds_ada_norm`` taken from the data.

    Raises:
        ConfigError: an override contradicts the data or another flag.
    """
    overrides = dict(spec.kwargs)
    model_class = model_class_of(spec.preset)
    is_dit = model_class is DiTTransformer2DModel
    for flag, key in (("--decay-mode", "decay_mode"), ("--alpha", "alpha"), ("--attention-backend", "attention_backend")):
        value = getattr(spec, key)
        if value is None:
            continue
        if is_dit:
            raise ConfigError(f"{flag} is an SDT-P setting; --model {spec.preset} (DiT) has no spatial decay")
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"{flag} {value!r} contradicts --model-kwargs {key}={overrides[key]!r}")
        overrides[key] = value
    derived = {"in_channels": in_channels, "sample_size": sample_size, "num_embeds_ada_norm": num_classes}
    if is_dit and "out_channels" not in overrides:
        derived["out_channels"] = 2 * in_channels  # DiT learns its variance (DiT's learn_sigma=True)
    for key, value in derived.items():
        if key not in overrides:
            continue
        given = overrides[key]
        if key == "num_embeds_ada_norm":
            if given < value:
                raise ConfigError(f"--model-kwargs num_embeds_ada_norm={given} but the data has {value} classes")
        elif given != value:
            source = {"in_channels": "the VAE's latent channels (3 in pixel space)",
                      "sample_size": "--resolution / the VAE's downsampling factor"}[key]
            raise ConfigError(f"--model-kwargs {key}={given} contradicts the data: {source} gives {value}")
    return {"_class_name": model_class.__name__, **preset_config(spec.preset), **derived, **overrides}


# ------------------------------------------------------------------------------------------------ data
def vae_config(name: str, subfolder: str | None) -> dict[str, Any]:
    """An ``AutoencoderKL`` config (local folder or hub id) without loading its weights.

    Raises:
        ConfigError: no such VAE, or not an ``AutoencoderKL``.
    """
    try:
        return dict(AutoencoderKL.load_config(name, subfolder=subfolder))
    except Exception as e:  # noqa: BLE001 - re-raised with the VAE named
        where = f"{name}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise ConfigError(f"--vae {where}: cannot load an AutoencoderKL config: {e}") from None


def vae_reference(name: str) -> str:
    """How a VAE is recorded for later loading: the absolute path of a local folder, else the hub id."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


@dataclass
class DataPlan:
    """Where the training inputs come from and what shape they have."""

    kind: str  # "images" or "latents"
    dataset: Any
    labels: np.ndarray
    num_classes: int
    id2label: dict[int, str] | None
    class_names: list[str] | None
    resolution: int
    vae_name: str | None  # resolved (vae_reference); None in pixel space
    vae_subfolder: str | None
    latent_channels: int
    latent_size: int
    scaling_factor: float
    vae_factor: int


def _plan_latent_cache(spec: DataSpec) -> DataPlan:
    """A latent cache: shapes, VAE and classes from its metadata, checked against the flags."""
    dataset = LatentCacheDataset(spec.latents_dir)
    meta = dataset.meta
    if spec.resolution is not None and spec.resolution != meta["resolution"]:
        raise ConfigError(f"--resolution {spec.resolution} but the latent cache was made at {meta['resolution']}")
    if spec.vae is not None and spec.vae.lower() == "none":
        raise ConfigError("--latents-dir with --vae none: a latent-space model needs its VAE for export and samples")
    vae_name = vae_reference(spec.vae) if spec.vae else meta["vae"]
    subfolder = spec.vae_subfolder if spec.vae else meta.get("vae_subfolder")
    cfg = vae_config(vae_name, subfolder)
    scaling = vae_scaling_factor(cfg)
    if not math.isclose(scaling, float(meta["scaling_factor"]), rel_tol=1e-6):
        raise ConfigError(f"--vae {vae_name} has scaling_factor {scaling}, the cache was made with {meta['scaling_factor']}")
    channels, size, width = meta["latent_shape"]
    if size != width:
        raise ConfigError(f"latent cache holds non-square latents {meta['latent_shape']}")
    if cfg.get("latent_channels") != channels:
        raise ConfigError(f"--vae {vae_name} has {cfg.get('latent_channels')} latent channels, the cache {channels}")
    id2label = {int(k): v for k, v in meta["id2label"].items()} if meta.get("id2label") else None
    return DataPlan("latents", dataset, dataset.labels, int(meta["num_classes"]), id2label, meta.get("class_names"),
                    int(meta["resolution"]), vae_name, subfolder, int(channels), int(size), scaling,
                    vae_downsampling_factor(cfg))


def _plan_images(spec: DataSpec, accelerator: Any) -> DataPlan:
    """An image folder or saved dataset, encoded on the fly by the VAE (or used as pixels without one)."""
    resolution = spec.resolution or DEFAULT_RESOLUTION
    name = spec.vae if spec.vae is not None else DEFAULT_VAE
    if name.lower() == "none":
        vae_name, subfolder, channels, factor, scaling = None, None, 3, 1, 1.0
    else:
        vae_name, subfolder = vae_reference(name), spec.vae_subfolder
        cfg = vae_config(vae_name, subfolder)
        channels, factor, scaling = int(cfg["latent_channels"]), vae_downsampling_factor(cfg), vae_scaling_factor(cfg)
    if resolution % factor:
        raise ConfigError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")
    with accelerator.local_main_process_first():  # a saved dataset may build caches: once per node
        source = load_image_source(spec.data_dir, spec.dataset, spec.dataset_split, spec.image_column,
                                   spec.label_column)
    dataset = ImageClassDataset(source, resolution)
    id2label = class_names_to_id2label(source.class_names, source.num_classes)
    return DataPlan("images", dataset, source.labels, source.num_classes, id2label, source.class_names, resolution,
                    vae_name, subfolder, channels, resolution // factor, scaling, factor)


def plan_data(spec: DataSpec, accelerator: Any) -> DataPlan:
    """Open the training data (image folder, saved dataset or latent cache) and check shapes against flags."""
    return _plan_latent_cache(spec) if spec.latents_dir else _plan_images(spec, accelerator)


# ------------------------------------------------------------------------------------------------- run
@dataclass
class RunPlan:
    """Everything decided before the first weight is built."""

    world: int
    rank: int
    per_device: int
    accum: int
    data: DataPlan
    model_config: dict[str, Any]
    sampler: EpochSampler
    sample_classes: list[int]
    resume_from: Path | None
    start_state: dict[str, Any] = field(default_factory=dict)
    rng_state: RngState | None = None  # this process's RNG states from the checkpoint (None: fresh or inexact)
    inexact: list[str] = field(default_factory=list)  # why the resume is not exact (with --allow-inexact-resume)
    finished: bool = False  # the checkpoint ends a finished run (training_done.json, pipeline/): nothing to do

    @property
    def start_step(self) -> int:
        return int(self.start_state.get("step", 0))


def _check_resume_state(resume_from: Path, start_state: dict[str, Any], model_config: dict[str, Any]) -> None:
    """The checkpoint must hold the model the flags describe (the attention backend may change)."""
    saved = dict(start_state.get("model_config") or {})
    saved.setdefault("_class_name", "SDTTransformer2DModel")  # checkpoints from before DiT could be trained
    if not saved:
        return
    changed = {k: (saved.get(k), model_config.get(k)) for k in set(saved) | set(model_config)
               if k != "attention_backend" and saved.get(k) != model_config.get(k)}
    if changed:
        raise ConfigError(f"--resume {resume_from}: the model config differs from the checkpoint's "
                          f"(field: (checkpoint, now)) {changed}")


def plan_run(settings: TrainSettings, accelerator: Any) -> RunPlan:
    """Check every flag against the processes, the data and the checkpoint to resume from.

    Raises:
        ConfigError: anything that would fail later (batch split, shapes, classes, resume point).
    """
    try:  # every process, before any compute: a file in the way or a read-only folder fails here, not at step N
        check_writable(settings.output_dir / "train_config.yaml")
    except OSError as e:
        raise ConfigError(f"--output-dir {settings.output_dir}: {e}") from None
    resume_from = resolve_resume(settings.resume, settings.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_device, accum = plan_batches(settings.global_batch_size, settings.per_device_batch, world)
    data = plan_data(settings.data, accelerator)
    model_config = resolve_model_config(settings.model, data.latent_channels, data.latent_size, data.num_classes)
    patch = model_config["patch_size"]
    if data.latent_size % patch:
        raise ConfigError(
            f"--resolution {data.resolution} is not divisible by the VAE factor {data.vae_factor} x patch size "
            f"{patch} = {data.vae_factor * patch}"
        )
    sampler = EpochSampler(len(data.labels), world, rank, settings.seed, shuffle=True,
                           random_flip=settings.data.random_flip)
    if len(sampler) < per_device:
        raise ConfigError(
            f"each of the {world} processes gets {len(sampler)} samples per epoch, fewer than one batch of "
            f"{per_device}; lower --global-batch-size / --per-device-batch"
        )
    sample_classes = list(settings.samples.classes or default_sample_classes(data.num_classes))
    bad = [c for c in sample_classes if not 0 <= c < model_config["num_embeds_ada_norm"]]
    if bad:
        raise ConfigError(f"--sample-classes {bad} outside [0, {model_config['num_embeds_ada_norm']})")
    start_state = read_training_state(resume_from) if resume_from else {}
    plan = RunPlan(world, rank, per_device, accum, data, model_config, sampler, sample_classes, resume_from,
                   start_state)
    if resume_from is not None:
        check_checkpoint(resume_from, start_state)
        _check_resume_state(resume_from, start_state, model_config)
        done = read_done(settings.output_dir)
        plan.finished = (done is not None and done["step"] == plan.start_step
                         and plan.start_step >= settings.intervals.max_steps
                         and (settings.output_dir / "pipeline" / "model_index.json").is_file())
        if not plan.finished:
            plan.rng_state, plan.inexact = _exactness(settings, plan)
    return plan


def _exactness(settings: TrainSettings, plan: RunPlan) -> tuple[RngState | None, list[str]]:
    """This process's RNG states and every reason (of any process) why the resume would not continue the run
    exactly: a missing or unusable RNG state file, another ``--seed``, another batch layout.

    Raises:
        ConfigError: there is a reason and ``--allow-inexact-resume`` was not given (on every process alike).
    """
    assert plan.resume_from is not None
    state, reasons = plan.start_state, []
    if state.get("seed") != settings.seed:
        reasons.append(f"--seed {settings.seed} differs from the checkpoint's seed {state.get('seed')} (it sets the "
                       f"data order and the noise)")
    layout = (state.get("num_processes"), state.get("per_device_batch"), state.get("grad_accum"))
    if layout != (plan.world, plan.per_device, plan.accum):
        reasons.append(f"{plan.world} processes x {plan.per_device} per device x {plan.accum} accumulation differ "
                       f"from the checkpoint's {layout[0]} x {layout[1]} x {layout[2]} (the data order and the RNG "
                       f"streams change)")
    rng_state, why = read_rng_states(plan.resume_from, state, plan.rank)
    reasons += [w for w in gather_object([why]) if w]  # every process learns every process's reason
    if reasons and not settings.allow_inexact_resume:
        raise ConfigError(f"--resume {plan.resume_from} would not continue the run exactly: {'; '.join(reasons)}. "
                          f"Pass --allow-inexact-resume to continue anyway (the log and metrics.jsonl then say so)")
    return rng_state, reasons
