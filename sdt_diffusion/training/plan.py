"""Planning a diffusion run before any compute: the data and its shapes, the VAE, the model config, the sample
classes (the engine adds the batch split and the resume point, :func:`~.engine.plan_run`).

Everything here reads files and configs only (no weights are built), so a bad flag, an unreadable dataset or
a model that does not fit the data fails in seconds with a :class:`~.config.ConfigError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..data import (
    EpochSampler,
    ImageClassDataset,
    LatentCacheDataset,
    class_names_to_id2label,
    load_image_source,
    parse_data_files,
)
from ..models.dit import DiTTransformer2DModel
from ..models.registry import MODEL_CLASSES, build_transformer, model_class_of, preset_config
from ..models.vae import vae_downsampling_factor, vae_scaling_factor
from ..utils.errors import ConfigError
from ..utils.labels import LabelIndex
from ..utils.validation import check_int
from .checkpointing import read_training_state
from .config import parse_model_kwargs
from .diffusion_config import DiffusionSettings, sample_classes
from .engine import RunPlan
from .export import default_sample_classes
from .flags import DEFAULT
from .init_from import (
    ClassMapping,
    InitSource,
    check_source_fits,
    class_mapping,
    diffusion_weight_names,
    log_resume_wins,
    open_diffusion_source,
)

__all__ = [
    "DEFAULT_RESOLUTION",
    "DEFAULT_VAE",
    "DataPlan",
    "DiffusionPlan",
    "check_model_config",
    "plan_data",
    "plan_diffusion",
    "resolve_model_config",
    "vae_config",
    "vae_reference",
]

logger = logging.getLogger("sdt_diffusion.training")

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_RESOLUTION = 256


def resolve_model_config(settings: DiffusionSettings, in_channels: int, sample_size: int,
                         num_classes: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset (or ``base``: an ``--init-from`` source's config) + overrides, with
    ``in_channels``/``sample_size``/``num_embeds_ada_norm`` taken from the data.

    Raises:
        ConfigError: an override contradicts the data or another flag.
    """
    preset = settings.model.model
    overrides = parse_model_kwargs(settings.model.model_kwargs)
    model_class = model_class_of(preset) if base is None else MODEL_CLASSES[base["_class_name"]]
    start = {"_class_name": model_class.__name__, **preset_config(preset)} if base is None else dict(base)
    is_dit = model_class is DiTTransformer2DModel
    given = {"decay_mode": settings.sdt.decay_mode, "alpha": settings.model.alpha,
             "attention_backend": settings.model.attention_backend}
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if is_dit:
            raise ConfigError(f"{flag} is an SDT-P setting; --model {preset} (DiT) has no spatial decay")
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"{flag} {value!r} contradicts --model-kwargs {key}={overrides[key]!r}")
        overrides[key] = value
    derived = {"in_channels": in_channels, "sample_size": sample_size, "num_embeds_ada_norm": num_classes}
    if is_dit and "out_channels" not in overrides and base is None:
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
    return {**start, **derived, **overrides}


_SIZES = ("patch_size", "sample_size", "in_channels", "out_channels", "num_layers", "num_attention_heads",
          "attention_head_dim", "num_embeds_ada_norm")


def _check_sizes(config: dict[str, Any], preset: str) -> None:
    """The config's sizes are positive integers (diffusers' DiT checks none of them: a ``patch_size`` of 0
    divides by zero)."""
    for key in _SIZES:
        if config.get(key) is not None:
            try:
                check_int(key, config[key], minimum=1)
            except ValueError as e:
                raise ConfigError(f"bad model configuration (--model {preset} with --model-kwargs): {e}") from None


def check_model_config(config: dict[str, Any], preset: str) -> None:
    """Refuse a config the model cannot take, with the field named, before anything uses it: its sizes must be
    positive integers, then it is built on the ``meta`` device (no memory; well under a second for XL).

    Raises:
        ConfigError: a size that is not a positive integer, or the model's constructor refuses the config.
    """
    _check_sizes(config, preset)
    try:
        with torch.device("meta"):
            build_transformer(config)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise ConfigError(f"bad model configuration (--model {preset} with --model-kwargs): {e}") from None


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


def _plan_latent_cache(settings: DiffusionSettings) -> DataPlan:
    """A latent cache: shapes, VAE and classes from its metadata, checked against the flags."""
    spec = settings.latents
    resolution = settings.data.resolution
    dataset = LatentCacheDataset(spec.latents_dir)
    meta = dataset.meta
    if resolution is not None and resolution != meta["resolution"]:
        raise ConfigError(f"--resolution {resolution} but the latent cache was made at {meta['resolution']}")
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


def _plan_images(settings: DiffusionSettings, accelerator: Any) -> DataPlan:
    """An image folder or a dataset (saved or load_dataset), encoded on the fly by the VAE (or used as pixels without one)."""
    spec, data = settings.latents, settings.data
    resolution = data.resolution or DEFAULT_RESOLUTION
    name = spec.vae if spec.vae is not None else DEFAULT_VAE
    if name.lower() == "none":
        vae_name, subfolder, channels, factor, scaling = None, None, 3, 1, 1.0
    else:
        vae_name, subfolder = vae_reference(name), spec.vae_subfolder
        cfg = vae_config(vae_name, subfolder)
        channels, factor, scaling = int(cfg["latent_channels"]), vae_downsampling_factor(cfg), vae_scaling_factor(cfg)
    if resolution % factor:
        raise ConfigError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")
    with accelerator.local_main_process_first():  # a datasets dataset may build caches: once per node
        source = load_image_source(data.data_dir, data.dataset, data.dataset_split, data.image_column,
                                   data.label_column, config=data.dataset_config,
                                   data_files=parse_data_files(data.data_files))
    dataset = ImageClassDataset(source, resolution)
    id2label = class_names_to_id2label(source.class_names, source.num_classes)
    return DataPlan("images", dataset, source.labels, source.num_classes, id2label, source.class_names, resolution,
                    vae_name, subfolder, channels, resolution // factor, scaling, factor)


def plan_data(settings: DiffusionSettings, accelerator: Any) -> DataPlan:
    """Open the training data (image folder, ``datasets`` dataset or latent cache) and check shapes against flags."""
    return _plan_latent_cache(settings) if settings.latents.latents_dir else _plan_images(settings, accelerator)


# ------------------------------------------------------------------------------------------------- run
@dataclass(kw_only=True)
class DiffusionPlan(RunPlan):
    """The engine's plan plus the data and the classes of the sample grids."""

    data: DataPlan
    sample_classes: list[int]
    model_name: str = ""  # the preset, or what an --init-from source was trained as (logs, cards, checkpoints)
    init: InitSource | None = None  # --init-from (None on a resume: the checkpoint wins)
    class_mapping: ClassMapping | None = None  # the source's classes onto the data's, where they differ


def plan_diffusion(settings: DiffusionSettings, accelerator: Any, **layout: Any) -> DiffusionPlan:
    """The data, the model config, the sampler and the sample classes, checked against each other.

    Raises:
        ConfigError: anything that would fail later (shapes, classes, batch larger than the data).
    """
    world, rank, per_device = layout["world"], layout["rank"], layout["per_device"]
    data = plan_data(settings, accelerator)
    init, base, model_name = plan_init(settings, layout["resume_from"], accelerator.is_main_process)
    model_config = resolve_model_config(settings, data.latent_channels, data.latent_size, data.num_classes, base)
    _check_sizes(model_config, settings.model.model)
    patch = model_config["patch_size"]
    if data.latent_size % patch:
        raise ConfigError(
            f"--resolution {data.resolution} is not divisible by the VAE factor {data.vae_factor} x patch size "
            f"{patch} = {data.vae_factor * patch}"
        )
    check_model_config(model_config, settings.model.model)
    mapping = None
    if init is not None:
        mapping = class_mapping(init.id2label, init.num_classes, data.id2label, data.num_classes,
                                settings.init.strict_classes)
        with torch.device("meta"):
            skeleton = build_transformer(model_config)
        check_source_fits(skeleton, init, mapping, *diffusion_weight_names(skeleton))
    sampler = EpochSampler(len(data.labels), world, rank, settings.run.seed, shuffle=True,
                           random_flip=settings.latents.random_flip)
    if len(sampler) < per_device:
        raise ConfigError(
            f"each of the {world} processes gets {len(sampler)} samples per epoch, fewer than one batch of "
            f"{per_device}; lower --global-batch-size / --per-device-batch"
        )
    index = LabelIndex(data.id2label, data.num_classes)
    try:
        classes = [c if isinstance(c, int) else index.lookup(c)
                   for c in sample_classes(settings) or default_sample_classes(data.num_classes)]
    except ValueError as e:
        raise ConfigError(f"--sample-classes: {e}") from None
    bad = [c for c in classes if not 0 <= c < model_config["num_embeds_ada_norm"]]
    if bad:
        raise ConfigError(f"--sample-classes {bad} outside [0, {model_config['num_embeds_ada_norm']})")
    return DiffusionPlan(**layout, model_config=model_config, sampler=sampler, num_samples=len(data.labels),
                         total_steps=settings.run.max_steps, checkpoint_every=settings.checkpoints.checkpoint_every,
                         data=data, sample_classes=classes, model_name=model_name, init=init,
                         class_mapping=mapping)


# ------------------------------------------------------------------------------------------- --init-from
def _explicit(settings: DiffusionSettings, name: str) -> bool:
    """Whether flag ``name`` was given (command line, ``--config`` or a caller), not a recipe's or code default."""
    source = settings.source(name)
    return source != DEFAULT and not source.startswith("recipe ")


def _check_model_flag(settings: DiffusionSettings, source: InitSource) -> None:
    """A given ``--model`` (with ``--model-kwargs``) must describe the source's architecture.

    Raises:
        ConfigError: naming ``--model``, ``--init-from`` and the fields that differ.
    """
    preset = settings.model.model
    wanted = model_class_of(preset).__name__
    if wanted != source.config.get("_class_name") and source.converted is None:
        raise ConfigError(f"--model {preset} builds a {wanted}, --init-from {source.reference} holds a "
                          f"{source.config.get('_class_name')}; drop --model (the source's architecture is used)")
    overrides = parse_model_kwargs(settings.model.model_kwargs)
    differ = {k: (overrides.get(k, v), source.config.get(k)) for k, v in preset_config(preset).items()
              if overrides.get(k, v) != source.config.get(k)}
    if differ:
        raise ConfigError(f"--model {preset} contradicts --init-from {source.reference} (field: (--model, source)) "
                          f"{differ}; drop --model (the source's architecture is used) or give the matching preset")


def plan_init(settings: DiffusionSettings, resume_from: Path | None, main: bool
              ) -> tuple[InitSource | None, dict[str, Any] | None, str]:
    """``(source, base config, model name)`` of ``--init-from``: the source's config is the architecture (a given
    ``--model`` must agree; an SDT-P ``--model`` converts a diffusers DiT).  On a resume the checkpoint wins: the
    source is not opened, and a run started from one keeps the architecture its checkpoint records.

    Raises:
        ConfigError: the source cannot be opened, or ``--model`` contradicts it.
    """
    given = settings.init.init_from
    if resume_from is not None:
        state = read_training_state(resume_from)
        if given and main:
            log_resume_wins(resume_from, given)
        if state.get("init_from"):  # a run started from a source: its architecture is the checkpoint's
            return None, {"_class_name": "SDTTransformer2DModel", **(state.get("model_config") or {})}, \
                str(state.get("model") or settings.model.model)
        return None, None, settings.model.model
    if not given:
        return None, None, settings.model.model
    explicit = _explicit(settings, "model")
    convert = explicit and model_class_of(settings.model.model).__name__ == "SDTTransformer2DModel"
    source = open_diffusion_source(given, settings.init.init_from_ema, convert)
    if explicit:
        _check_model_flag(settings, source)
        return source, source.config, settings.model.model
    if main:
        logger.info("--init-from %s: the model is the source's %s (--model %s from the %s is not used)", given,
                    source.config.get("_class_name"), settings.model.model, settings.source("model"))
    return source, source.config, source.model_name or str(source.config.get("_class_name"))
