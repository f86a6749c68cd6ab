"""sdt-diffusion: the Spatial Decay Transformer (SDT-P) as a diffusers-compatible diffusion backbone."""

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers resolves loaders through it)

from .attention_backends import ATTENTION_BACKENDS, DecayInputs, register_attention_backend
from .models import MODEL_SIZES, PRESETS, SDTTransformer2DModel, count_parameters
from .spatial_decay import DECAY_MODES, spatial_decay_bias

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_BACKENDS",
    "DECAY_MODES",
    "DecayInputs",
    "MODEL_SIZES",
    "ModelMixin",
    "PRESETS",
    "SDTTransformer2DModel",
    "count_parameters",
    "register_attention_backend",
    "spatial_decay_bias",
]
