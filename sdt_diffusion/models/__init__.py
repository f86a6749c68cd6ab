"""Models of sdt-diffusion: the shared Spatial Decay Attention module, the SDT-P diffusion transformer and the
SDT-H classification backbone (transformers classes here; the timm models register when timm is installed)."""

from importlib.util import find_spec

from .sdt_h import SDT_H_PRESETS, SDTH
from .sdt_h_transformers import SDTHBackbone, SDTHConfig, SDTHForImageClassification, SDTHModel
from .spatial_decay_attention import SpatialDecayAttention
from .transformer_sdt import MODEL_SIZES, PRESETS, SDTTransformer2DModel
from .utils import count_parameters

if find_spec("timm") is not None:  # optional dependency: registers sdt_h_tiny / sdt_h_small / sdt_h_base
    from . import sdt_h_timm  # noqa: F401

__all__ = [
    "MODEL_SIZES",
    "PRESETS",
    "SDTH",
    "SDTHBackbone",
    "SDTHConfig",
    "SDTHForImageClassification",
    "SDTHModel",
    "SDTTransformer2DModel",
    "SDT_H_PRESETS",
    "SpatialDecayAttention",
    "count_parameters",
]
