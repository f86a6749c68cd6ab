"""Every diffusion transformer the trainer builds and the pipeline samples: SDT-P and its DiT baseline.

One place maps a preset name (``SDT-P-B/2``, ``DiT-B/2``) or a stored class name to the model class, builds it
with its own initialisation, and answers the two questions the pipeline and the trainer ask of either
model: how many classes it has (its null label for guidance) and whether it predicts its variance.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .dit import DIT_PRESETS, DiTTransformer2DModel, dit_initialize, single_label_dropout
from .transformer_sdt import PRESETS, SDTTransformer2DModel

__all__ = [
    "MODEL_CLASSES",
    "all_presets",
    "build_transformer",
    "learns_sigma",
    "model_class_of",
    "num_classes_of",
    "preset_config",
]

# Every class the trainer can build, by config class name (stored in checkpoints and exports).
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "SDTTransformer2DModel": SDTTransformer2DModel,
    "DiTTransformer2DModel": DiTTransformer2DModel,
}


def model_class_of(preset: str) -> type[nn.Module]:
    """The model class a preset builds."""
    if preset in DIT_PRESETS:
        return DiTTransformer2DModel
    if preset in PRESETS:
        return SDTTransformer2DModel
    raise ValueError(f"unknown model preset {preset!r}; choose one of {all_presets()}")


def preset_config(preset: str) -> dict[str, Any]:
    """The size fields of a preset (layers, heads, head width, patch size)."""
    model_class_of(preset)  # a ValueError naming the choices for an unknown preset
    return dict(DIT_PRESETS.get(preset) or PRESETS[preset])


def all_presets() -> list[str]:
    """Every preset name the trainer accepts."""
    return sorted(PRESETS) + sorted(DIT_PRESETS)


def build_transformer(config: dict[str, Any]) -> nn.Module:
    """A freshly initialised model from ``config``; its ``_class_name`` (a key of :data:`MODEL_CLASSES`, as in
    diffusers' saved configs) picks the class, ``SDTTransformer2DModel`` when absent.

    Every model drops class labels once per sample and forward (DiT's label dropout): SDT-P by construction,
    diffusers' DiT through :func:`~sdt_diffusion.models.dit.single_label_dropout`."""
    config = dict(config)
    model_class = config.pop("_class_name", "SDTTransformer2DModel")
    try:
        cls = MODEL_CLASSES[model_class]
    except KeyError:
        raise ValueError(f"unknown model class {model_class!r}; choose one of {sorted(MODEL_CLASSES)}") from None
    model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    if cls is DiTTransformer2DModel:
        return single_label_dropout(dit_initialize(model))
    return model


def num_classes_of(transformer: nn.Module) -> int:
    """Number of classes of a class-conditional transformer; its null (guidance) label is this number."""
    if isinstance(transformer, SDTTransformer2DModel):
        return transformer.num_classes
    return int(transformer.config.num_embeds_ada_norm)


def learns_sigma(transformer: nn.Module) -> bool:
    """Whether the transformer predicts its variance as well (output channels = 2 x input channels)."""
    cfg = transformer.config
    if isinstance(transformer, SDTTransformer2DModel):
        return bool(cfg.learn_sigma)
    out = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
    return out == 2 * cfg.in_channels
