"""sdt-diffusion: the Spatial Decay Transformer (SDT-P) as a diffusers-compatible diffusion backbone."""

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers resolves loaders through it)

from .attention import (
    ATTENTION_BACKENDS,
    DECAY_MODES,
    DecayInputs,
    register_attention_backend,
    spatial_decay_bias,
)
from .models import (
    MODEL_SIZES,
    PRESETS,
    SDTHBackbone,
    SDTHConfig,
    SDTHForImageClassification,
    SDTHModel,
    SDTTransformer2DModel,
    SpatialDecayAttention,
    count_parameters,
)
from .models.convert_dit import convert_dit
from .pipelines import SDTPipeline  # no circle: pipelines/ imports submodules, never this package
from .schedulers import default_scheduler, make_scheduler
from .utils.images import make_labelled_grid
from .utils.labels import get_imagenet_id2label

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_BACKENDS",
    "DECAY_MODES",
    "DecayInputs",
    "MODEL_SIZES",
    "ModelMixin",
    "PRESETS",
    "SDTHBackbone",
    "SDTHConfig",
    "SDTHForImageClassification",
    "SDTHModel",
    "SDTPipeline",
    "SDTTransformer2DModel",
    "SpatialDecayAttention",
    "convert_dit",
    "count_parameters",
    "default_scheduler",
    "get_imagenet_id2label",
    "make_labelled_grid",
    "make_scheduler",
    "register_attention_backend",
    "spatial_decay_bias",
]
