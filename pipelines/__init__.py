"""Pipelines of sdt-diffusion (installed as ``sdt_diffusion.pipelines``)."""

from .pipeline_sdt import SDTPipeline

__all__ = ["SDTPipeline"]
