"""Helpers shared by the models of sdt-diffusion (SDT-P, SDT-H)."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of ``model``: the trainable ones (``requires_grad``), or all with ``trainable_only=False``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["count_parameters"]
