"""Pipelines of sdt-diffusion (installed as ``sdt_diffusion.pipelines``)."""

from .pipeline_sdt import SCHEDULER_NAMES, SDTPipeline, default_scheduler, make_scheduler

__all__ = ["SCHEDULER_NAMES", "SDTPipeline", "default_scheduler", "make_scheduler"]
