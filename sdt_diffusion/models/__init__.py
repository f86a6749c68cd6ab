"""Models of sdt-diffusion: the shared Spatial Decay Attention module and the SDT-P diffusion transformer."""

from .spatial_decay_attention import SpatialDecayAttention
from .transformer_sdt import MODEL_SIZES, PRESETS, SDTTransformer2DModel, count_parameters

__all__ = ["MODEL_SIZES", "PRESETS", "SDTTransformer2DModel", "SpatialDecayAttention", "count_parameters"]
