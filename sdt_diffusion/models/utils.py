"""Helpers shared by the models of sdt-diffusion (SDT-P, SDT-H)."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of ``model``: the trainable ones (``requires_grad``), or all with ``trainable_only=False``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def dit_base_init(model: nn.Module, patch_embed: nn.Conv2d) -> None:
    """The first half of DiT's ``initialize_weights`` (DiT ``models.py``), for any module naming: every
    ``nn.Linear`` xavier-uniform with a zero bias, and the patch embedding's convolution xavier-uniform as the
    linear map it is, with a zero bias. The model-specific rest (embedding tables, adaLN-Zero) follows it."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    weight = patch_embed.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.zeros_(patch_embed.bias)


__all__ = ["count_parameters", "dit_base_init"]
