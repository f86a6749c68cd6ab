"""What the pipeline, the trainer and the tools need to know about the latent autoencoder (diffusers'
``AutoencoderKL``, e.g. SD-VAE): its downsampling factor, its latent scale, how latents are drawn and
decoded.  Written once here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SD_VAE_SCALING_FACTOR",
    "decode_latents",
    "encode_latents",
    "posterior_sample",
    "vae_downsampling_factor",
    "vae_scaling_factor",
]

# Stable Diffusion's VAE latent scale (diffusers' AutoencoderKL default ``scaling_factor``).
SD_VAE_SCALING_FACTOR = 0.18215


def _config(vae_or_config: Any) -> Mapping[str, Any]:
    return vae_or_config.config if hasattr(vae_or_config, "config") else vae_or_config


def vae_downsampling_factor(vae_or_config: Any) -> int:
    """Pixels per latent along each side: 2 to the number of encoder blocks minus one (8 for SD-VAE and for
    the tiny TAESD-style ``AutoencoderTiny``, whose config names them ``encoder_block_out_channels``)."""
    cfg = _config(vae_or_config)
    blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels") or (0,)
    return 2 ** (len(blocks) - 1)


def vae_scaling_factor(vae_or_config: Any) -> float:
    """The factor that brings the VAE's latents to unit variance (0.18215 for SD-VAE)."""
    return float(_config(vae_or_config).get("scaling_factor", SD_VAE_SCALING_FACTOR))


def posterior_sample(mean: Tensor, std: Tensor, eps: Tensor, scaling_factor: float) -> Tensor:
    """A latent ``z = (mean + std * eps) * scaling_factor`` drawn from the encoder's posterior."""
    return (mean + std * eps) * scaling_factor


@torch.no_grad()
def encode_latents(vae: Any, pixels: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
    """Scaled latents of ``pixels`` in [-1, 1]: a posterior sample (DiT's training input) or its mean."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mean
    return z * vae_scaling_factor(vae)


@torch.no_grad()
def decode_latents(vae: Any, latents: Tensor) -> Tensor:
    """Images in about [-1, 1] from scaled latents: undo ``scaling_factor`` (and ``shift_factor`` if set)."""
    z = latents / vae_scaling_factor(vae)
    shift = _config(vae).get("shift_factor", None)
    if shift is not None:
        z = z + shift
    return vae.decode(z.to(vae.dtype)).sample
