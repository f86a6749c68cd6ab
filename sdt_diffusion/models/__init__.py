"""Models of sdt-diffusion."""

from .transformer_sdt import MODEL_SIZES, PRESETS, SDTTransformer2DModel, count_parameters

__all__ = ["MODEL_SIZES", "PRESETS", "SDTTransformer2DModel", "count_parameters"]
