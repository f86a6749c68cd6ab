"""Pipelines of sdt-diffusion (installed as ``sdt_diffusion.pipelines``)."""
