"""Attention backends: how one Spatial Decay Attention core ``softmax(QK^T/sqrt(d) + M) V`` is run.

A backend is a function ``(q, k, v, decay) -> out`` with q, k, v of shape (B, N, L, d) (RoPE already
applied) and a :class:`DecayInputs` that carries what the decay variant needs (gates, RMT gammas,
grid size) rather than a materialised L x L bias, so that a fused backend can compute the decay on
the fly.  ``"math"`` is the reference every other backend is tested against.

==============  ==========================================================================  ==========
backend         how M is applied                                                            L x L bias
==============  ==========================================================================  ==========
``math``        dense M, explicit float32 softmax (reference)                               stored
``sdpa``        dense M as ``attn_mask`` of ``scaled_dot_product_attention``                stored
``augmented``   ``cdsf``/``fixed``: M written as a dot product of extra Q and K dims, SDPA  none
                with no mask (flash / cuDNN / memory-efficient kernels); others: ``sdpa``
``flex``        FlexAttention ``score_mod`` (compiled); ``decomposed``: ``sdpa``.  CPU:      none
                inference only (PyTorch has no FlexAttention backward on CPU)
``auto``        :func:`auto_backend_name`                                                   --
==============  ==========================================================================  ==========
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import spatial_decay as eq
from .modes import DecayInputs, decay_mode


def dense_decay_bias(decay: DecayInputs) -> Tensor | None:
    """The materialised bias M, (B, N, L, L) or (N, L, L), or None for ``"none"``."""
    spec = decay_mode(decay.mode)
    if spec.dense_bias is not None:
        return spec.dense_bias(decay)
    if spec.axial is None:
        return None
    raise ValueError(f"decay_mode {decay.mode!r} has no dense L x L bias")


def _sdpa_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _run_dense(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs, attend) -> Tensor:
    axial = decay_mode(decay.mode).axial
    if axial is not None:
        return axial(q, k, v, decay, attend)
    return attend(q, k, v, dense_decay_bias(decay))


def math_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs) -> Tensor:
    """Reference: dense bias and an explicit float32 softmax (eq. 10)."""
    return _run_dense(q, k, v, decay, eq.attention_with_bias)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs) -> Tensor:
    """Dense bias through ``torch.nn.functional.scaled_dot_product_attention`` (trains on CPU and CUDA)."""
    return _run_dense(q, k, v, decay, _sdpa_with_bias)


# ------------------------------------------------------------------------------------- augmented
def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def augment_qk(q: Tensor, k: Tensor, decay: DecayInputs, multiple: int = 8) -> tuple[Tensor, Tensor]:
    """``Q' = [Q, f_q, 0]`` and ``K' = [K, f_k, 0]`` with ``Q' K'^T / sqrt(d) = Q K^T / sqrt(d) + M + r_i``.

    ``f_q . f_k = sqrt(d) M + r_i`` (``spatial_decay.decay_query_features`` and friends; r_i depends on
    the query only and cancels in the softmax).  The factor sqrt(d) cancels the 1/sqrt(d) the kernel
    applies to every dim, so the kernel runs with its usual scale and Q is left untouched.  The decay
    rates are computed in float32 (or wider), scaled by sqrt(d) and rounded to q's dtype once; every
    feature is then an exact product in that dtype (see the identity in ``spatial_decay``).  Zero
    columns pad the width to a multiple of ``multiple``.
    """
    b, n, seq, d = q.shape
    codes = decay.codes if decay.codes is not None else eq.threshold_codes(decay.height, decay.width, q.device)
    spec = decay_mode(decay.mode)
    if spec.rates is not None:
        rates = (spec.rates(decay) * math.sqrt(d)).to(q.dtype)  # (B, N, L)
        f_q, f_k = eq.decay_query_features(rates, codes), eq.decay_key_features(rates, codes)
    elif spec.fixed_gamma:
        rates = (eq.upcast(decay.log_gamma) * math.sqrt(d)).to(q.dtype)  # (N,)
        f_q = eq.fixed_query_features(rates, codes).expand(b, n, seq, codes.shape[-1])
        f_k = codes.to(q.dtype).expand(b, n, seq, codes.shape[-1])  # key side: the codes V_j
    else:
        raise ValueError(f"decay_mode {decay.mode!r} has no low-rank form")
    extra = f_q.shape[-1]
    zeros = q.new_zeros(b, n, seq, _round_up(d + extra, multiple) - d - extra)
    return torch.cat([q, f_q.to(q.dtype), zeros], dim=-1), torch.cat([k, f_k.to(k.dtype), zeros.to(k.dtype)], dim=-1)


def augmented_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs) -> Tensor:
    """Exact CDSF / fixed-decay attention as plain SDPA with no mask on augmented Q and K.

    ``softmax([Q, f_q][K, f_k]^T / sqrt(d)) V = softmax(Q K^T / sqrt(d) + M) V`` exactly (the per-row
    remainder cancels in the softmax); gradients reach Q, K, V and the gates by autograd.  V is
    zero-padded to the augmented width (the flash kernels, CPU and CUDA, need equal widths) and the
    output sliced back.  ``none`` is plain SDPA; ``1d``, ``bidirectional`` and ``decomposed`` fall back to
    the dense ``sdpa`` backend.
    """
    if not decay_mode(decay.mode).low_rank:
        return sdpa_attention(q, k, v, decay)
    d = q.shape[-1]
    q_aug, k_aug = augment_qk(q, k, decay)
    if v.shape[-1] != q_aug.shape[-1]:
        v_pad = F.pad(v, (0, q_aug.shape[-1] - v.shape[-1]))
        return F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1.0 / math.sqrt(d))[..., :d]
    return F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0 / math.sqrt(d))


# ------------------------------------------------------------------------------------- flex
_COMPILED_FLEX: Callable[..., Tensor] | None = None


def _flex_kernel(compiled: bool) -> Callable[..., Tensor]:
    """``flex_attention``, wrapped in ``torch.compile`` once (eager FlexAttention materialises scores)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_score_mod(decay: DecayInputs) -> eq.ScoreMod | None:
    """The ``score_mod`` adding M for ``decay`` (None for ``none``); the captured tensors are (B, N, L) views
    of the gates or their prefix sums, two per quantity (one for the query index, one for the key)."""
    spec = decay_mode(decay.mode)
    if spec.score_mod is not None:
        return spec.score_mod(decay)
    if spec.axial is None and spec.dense_bias is None:
        return None
    raise ValueError(f"decay_mode {decay.mode!r} has no score_mod")


def flex_decay_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs, compiled: bool = True) -> Tensor:
    """Spatial decay attention through FlexAttention; ``compiled=False`` runs PyTorch's unfused eager path.

    ``decomposed`` (whose biases are only H x H and W x W) falls back to ``sdpa``.  PyTorch implements
    no FlexAttention backward on CPU: there, with gradients required, this raises.
    """
    if decay_mode(decay.mode).axial is not None:
        return sdpa_attention(q, k, v, decay)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, decay.gates)
    ):
        raise NotImplementedError(
            "attention_backend='flex' cannot train on CPU: PyTorch's FlexAttention has no CPU backward. "
            "Use 'augmented' (exact, fused) or 'sdpa' on CPU, or run under torch.no_grad()."
        )
    if not torch.is_grad_enabled():  # FlexAttention on CPU checks requires_grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    score_mod = flex_score_mod(decay)
    return _flex_kernel(compiled)(q, k, v, score_mod=score_mod)


def flex_attention_backend(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs) -> Tensor:
    """Registered ``"flex"`` backend: compiled FlexAttention (CUDA: training and inference; CPU: inference)."""
    return flex_decay_attention(q, k, v, decay, compiled=True)


AttentionBackend = Callable[[Tensor, Tensor, Tensor, DecayInputs], Tensor]

ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "math": math_attention,
    "sdpa": sdpa_attention,
    "augmented": augmented_attention,
    "flex": flex_attention_backend,
}


def register_attention_backend(name: str, fn: AttentionBackend) -> None:
    """Add a backend under ``name`` (the seam fused kernels plug into)."""
    ATTENTION_BACKENDS[name] = fn


def available_backends() -> tuple[str, ...]:
    """Names accepted by the ``attention_backend`` config field."""
    return (*ATTENTION_BACKENDS, "auto")


def resolve_backend(name: str, device: torch.device, mode: str) -> AttentionBackend:
    """The backend function for ``name``; ``"auto"`` picks the fastest exact one for the device."""
    if name == "auto":
        name = auto_backend_name(device, mode)
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention_backend {name!r}; choose one of {available_backends()}"
        ) from None


def auto_backend_name(device: torch.device | str, mode: str) -> str:
    """The backend ``"auto"`` resolves to on ``device`` for ``decay_mode``.

    ``cdsf`` and ``fixed`` have an exact low-rank form: ``"augmented"`` (plain SDPA, no L x L bias) on
    every device.  CUDA: it runs on the flash / cuDNN kernels.  CPU (measured, benchmarks/RESULTS.md):
    the training step ties the dense ``"sdpa"`` path at 256 tokens with 12% less memory, and the
    attention is 1.4-1.8x faster at 1024 tokens.  ``none`` is plain SDPA; the variants without a fused
    form (``1d``, ``bidirectional``, ``decomposed``) use the dense ``"sdpa"`` path.
    """
    return "augmented" if decay_mode(mode).low_rank else "sdpa"
