"""Attention backends: how one Spatial Decay Attention core ``softmax(QK^T/sqrt(d) + M) V`` is run.

A backend is a function ``(q, k, v, decay) -> out`` with q, k, v of shape (B, N, L, d) (RoPE already
applied) and a :class:`DecayInputs` that carries what the decay variant needs (gates, RMT gammas,
grid size) rather than a materialised L x L bias, so that a fused backend can compute the decay on
the fly.  ``"math"`` is the reference every other backend is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import spatial_decay as eq


@dataclass
class DecayInputs:
    """What the decay of one attention call depends on.

    Attributes:
        mode: one of :data:`~sdt_diffusion.spatial_decay.DECAY_MODES`.
        height, width: token grid.
        alpha: CDSF scale (eq. 8).
        gates: G = log sigma(X W_g), float32 (B, L, N), for ``cdsf``, ``1d``, ``bidirectional``.
        gate_logits_h, gate_logits_w: F_H and F_W (B, L, N) for ``decomposed`` (eq. 11).
        log_gamma: (N,) RMT decay for ``fixed``.
    """

    mode: str
    height: int
    width: int
    alpha: float = 0.1
    gates: Tensor | None = None
    gate_logits_h: Tensor | None = None
    gate_logits_w: Tensor | None = None
    log_gamma: Tensor | None = None


def dense_decay_bias(decay: DecayInputs) -> Tensor | None:
    """The materialised bias M, (B, N, L, L) or (N, L, L), or None for ``"none"``."""
    mode = decay.mode
    if mode == "none":
        return None
    if mode == "cdsf":
        b, _, n = decay.gates.shape
        return eq.spatial_decay_bias(decay.gates.reshape(b, decay.height, decay.width, n), decay.alpha)
    if mode == "fixed":
        return eq.fixed_decay_bias(decay.log_gamma, decay.height, decay.width)
    if mode == "1d":
        return eq.raster_decay_bias(decay.gates)
    if mode == "bidirectional":
        return eq.bidirectional_decay_bias(decay.gates)
    raise ValueError(f"decay_mode {mode!r} has no dense L x L bias")


def _sdpa_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _run_dense(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs, attend) -> Tensor:
    if decay.mode == "decomposed":
        return eq.decomposed_attention(
            q, k, v, decay.gate_logits_h, decay.gate_logits_w, decay.height, decay.width, attend=attend
        )
    return attend(q, k, v, dense_decay_bias(decay))


def math_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs) -> Tensor:
    """Reference: dense bias and an explicit float32 softmax (eq. 10)."""
    return _run_dense(q, k, v, decay, eq.attention_with_bias)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs) -> Tensor:
    """Dense bias through ``torch.nn.functional.scaled_dot_product_attention`` (trains on CPU and CUDA)."""
    return _run_dense(q, k, v, decay, _sdpa_with_bias)


AttentionBackend = Callable[[Tensor, Tensor, Tensor, DecayInputs], Tensor]

ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "math": math_attention,
    "sdpa": sdpa_attention,
}


def register_attention_backend(name: str, fn: AttentionBackend) -> None:
    """Add a backend under ``name`` (the seam fused kernels plug into)."""
    ATTENTION_BACKENDS[name] = fn


def available_backends() -> tuple[str, ...]:
    """Names accepted by the ``attention_backend`` config field."""
    return (*ATTENTION_BACKENDS, "auto")


def resolve_backend(name: str, device: torch.device, decay_mode: str) -> AttentionBackend:
    """The backend function for ``name``; ``"auto"`` picks the fastest exact one for the device."""
    if name == "auto":
        name = auto_backend_name(device, decay_mode)
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention_backend {name!r}; choose one of {available_backends()}"
        ) from None


def auto_backend_name(device: torch.device, decay_mode: str) -> str:
    """The backend ``"auto"`` resolves to on ``device`` for ``decay_mode``."""
    return "sdpa"
