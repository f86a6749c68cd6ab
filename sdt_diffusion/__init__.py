"""sdt-diffusion: the Spatial Decay Transformer (SDT-P) as a diffusers-compatible diffusion backbone."""

from typing import Any

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers resolves loaders through it)

from .attention_backends import ATTENTION_BACKENDS, DecayInputs, register_attention_backend
from .labels import get_imagenet_id2label
from .models import MODEL_SIZES, PRESETS, SDTTransformer2DModel, count_parameters
from .spatial_decay import DECAY_MODES, spatial_decay_bias
from .visualization import make_labelled_grid

__version__ = "0.1.0"

# The pipeline pulls in diffusers' pipeline machinery (a few seconds); import it on first use.
_LAZY = {"SDTPipeline", "default_scheduler", "make_scheduler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'sdt_diffusion' has no attribute {name!r}")


__all__ = [
    "ATTENTION_BACKENDS",
    "DECAY_MODES",
    "DecayInputs",
    "MODEL_SIZES",
    "ModelMixin",
    "PRESETS",
    "SDTPipeline",
    "SDTTransformer2DModel",
    "count_parameters",
    "default_scheduler",
    "get_imagenet_id2label",
    "make_labelled_grid",
    "make_scheduler",
    "register_attention_backend",
    "spatial_decay_bias",
]
