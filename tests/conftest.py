"""Shared tiny models for offline CPU tests."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from sdt_diffusion import SDTTransformer2DModel

TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, patch_size=2,
                        num_embeds_ada_norm=10, gate_rank=4, lpe_kernel_size=3)


def make_tiny_transformer(seed: int = 0, randomise: bool = True, **overrides) -> SDTTransformer2DModel:
    """A 2-layer SDT on 8x8x4 latents with 10 classes; ``randomise`` un-zeros adaLN-Zero so outputs vary."""
    torch.manual_seed(seed)
    model = SDTTransformer2DModel(**{**TINY_TRANSFORMER, **overrides})
    if randomise:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name or "attn.gate." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def make_tiny_vae(seed: int = 0):
    """A randomly initialised 2-level AutoencoderKL: 3x16x16 images <-> 4x8x8 latents (factor 2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
    ).eval()


def forward_backward(model, x, t, y):
    """The output of ``model`` and every parameter's gradient of ``mean(out**2)``."""
    out = model(x, t, y).sample
    out.square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture
def tiny_transformer() -> SDTTransformer2DModel:
    return make_tiny_transformer()


@pytest.fixture
def tiny_vae():
    return make_tiny_vae()
