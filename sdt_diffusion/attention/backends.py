"""Attention backends: how one Spatial Decay Attention core ``softmax(QK^T/sqrt(d) + M) V`` is run.

A backend is a function ``(q, k, v, decay) -> out`` with q, k, v of shape (B, N, L, d) (RoPE already
applied) and a :class:`DecayInputs` that carries what the decay variant needs (gates, RMT gammas,
grid size) rather than a materialised L x L bias, so that a fused backend can compute the decay on
the fly.  ``"math"`` is the reference every other backend is tested against.  Each backend declares what
it reads of the token grid (:data:`BACKEND_GRID_NEEDS`: threshold codes, distance matrix, or nothing);
``grid.GridContext.build`` computes exactly that once per grid and forward.

==============  ==========================================================================  ==========
backend         how M is applied                                                            L x L bias
==============  ==========================================================================  ==========
``math``        dense M, explicit float32 softmax (reference)                               stored
``sdpa``        dense M as ``attn_mask`` of ``scaled_dot_product_attention``                stored
``augmented``   ``cdsf``/``fixed``: M written as a dot product of extra Q and K dims, SDPA  none
                with no mask (flash / cuDNN / memory-efficient kernels); others: ``sdpa``
``dense``       ``cdsf``: dense M as SDPA's mask at width d, backward recomputes the        none kept
                probabilities per sample; other modes: ``sdpa``                             for backward
``flex``        FlexAttention ``score_mod`` (compiled); ``decomposed``: ``sdpa``.  CPU:     none
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
from .modes import DecayInputs, DecayMode, decay_mode


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
    codes = codes.to(q.dtype)
    t = codes.shape[-1]
    spec = decay_mode(decay.mode)

    def columns(c: Tensor) -> Tensor:  # a (..., L, m) constant as a broadcast (B, N, L, m) view, not a copy
        return c.expand(b, n, seq, c.shape[-1])

    # One concatenation per side: the features of ``decay_query_features`` / ``decay_key_features`` (or the
    # fixed decay's), their constant columns as broadcast views and the rate columns as one product each.
    if spec.rates is not None:
        a = (spec.rates(decay) * math.sqrt(d)).to(q.dtype)[..., None]  # (B, N, L, 1)
        q_parts = [q, columns(q.new_full((1, 1), 0.5 * t)), columns(-0.5 * codes), -0.5 * a * codes]
        k_parts = [k, a, a * codes, columns(codes)]
    elif spec.fixed_gamma:
        c = (eq.upcast(decay.log_gamma) * math.sqrt(d)).to(q.dtype)  # (N,)
        q_parts = [q, eq.fixed_query_features(c, codes).expand(b, n, seq, t)]
        k_parts = [k, columns(codes)]  # key side: the codes V_j
    else:
        raise ValueError(f"decay_mode {decay.mode!r} has no low-rank form")
    width = d + sum(part.shape[-1] for part in q_parts[1:])
    zeros = columns(q.new_zeros(1, _round_up(width, multiple) - width))
    return torch.cat([*q_parts, zeros], dim=-1), torch.cat([*k_parts, zeros.to(k.dtype)], dim=-1)


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


# ------------------------------------------------------------------------------------- dense
def rates_bias(rates: Tensor, distance: Tensor) -> Tensor:
    """``M[..., i, j] = (a_i + a_j) d(i, j)`` from rates a (..., L) and the distance matrix d (L, L), one pass.

    Equal to CDSF's ``-|1/2 (G_i + G_j) d(i, j) alpha|`` for ``a = alpha/2 G`` (G <= 0, alpha >= 0; eq. 8-9).
    """
    rates = rates.contiguous()
    return torch.add(rates[..., :, None], rates[..., None, :]).mul_(distance)


# The dense backend works on groups of samples whose (samples * N, L, L) tensors have about this many elements:
# small enough to stay in cache (a whole-batch mask is a fresh B*N*L*L allocation per layer, slow to build on
# CPU), large enough that each kernel call has work for several threads.
DENSE_CHUNK_ELEMENTS = 2**21


def _sample_chunks(batch: int, heads: int, seq: int) -> list[slice]:
    size = max(1, DENSE_CHUNK_ELEMENTS // (heads * seq * seq))
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


def _dense_rates_forward(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, distance: Tensor) -> Tensor:
    """SDPA with the mask ``(a_i + a_j) d(i, j)`` built and used one group of samples at a time."""
    b, n, seq, d = q.shape
    out = q.new_empty((b, seq, n, d)).transpose(1, 2)  # token-major, as SDPA lays out its own output
    for chunk in _sample_chunks(b, n, seq):
        mask = rates_bias(rates[chunk], distance).to(q.dtype)
        out[chunk] = F.scaled_dot_product_attention(q[chunk], k[chunk], v[chunk], attn_mask=mask)
    return out


# The dense backend's forward and backward are custom operators: eager they run the code below; under
# torch.compile they stay opaque calls (no graph break, and inductor neither unrolls the sample loop nor
# re-derives the L x L work, which it does no faster than these ATen kernels on CPU).
@torch.library.custom_op("sdt_diffusion::dense_rates_attention", mutates_args=())
def dense_rates_attention(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, distance: Tensor) -> Tensor:
    """``softmax(Q K^T / sqrt(d) + M) V`` with ``M = (a_i + a_j) d(i, j)``, keeping no L x L tensor for backward.

    q, k, v: (B, N, L, d); rates a: (B, N, L); distance d: (L, L).  Forward: M is built and passed to SDPA as
    its mask (a mask without gradient, which SDPA's fused CPU kernel accepts), so attention runs at head
    width d.  The backward (:func:`dense_rates_attention_backward`) recomputes the probabilities.  Saved for
    it: q, k, v, the rates and the output.  Returns (B, N, L, d) laid out token-major, as SDPA's output.
    """
    return _dense_rates_forward(q, k, v, rates, distance)


@dense_rates_attention.register_fake
def _dense_rates_attention_fake(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, distance: Tensor) -> Tensor:
    b, n, seq, d = q.shape
    return q.new_empty((b, seq, n, d)).transpose(1, 2)


@torch.library.custom_op("sdt_diffusion::dense_rates_attention_backward", mutates_args=())
def dense_rates_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rates: Tensor, distance: Tensor, out: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, d rates) of :func:`dense_rates_attention`.

    Recomputes ``P = softmax(Q K^T / sqrt(d) + M)``; ``dS = P * (dP - rowsum(dO * O))`` gives dq, dk, dv and
    ``da_i = sum_j dS[i, j] d(i, j) + sum_j dS[j, i] d(j, i)``.  Works on a few samples at a time
    (:data:`DENSE_CHUNK_ELEMENTS`); dq, dk, dv come back token-major, the layout of the projection that
    produced q, k and v.
    """
    b, n, seq, d = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(d)
    with torch.autocast(q.device.type, enabled=False):
        delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1, keepdim=True)  # rowsum(dO * O), (B, N, L, 1)
        dq, dk, dv = (q.new_empty((b, seq, n, d), dtype=dtype).transpose(1, 2) for _ in range(3))
        grad_rates = rates.new_empty((b, n, seq))
        for chunk in _sample_chunks(b, n, seq):
            c = len(range(b)[chunk])
            # (c, N, L, .) -> (c * N, L, .), a copy only when c > 1
            qc, kc, vc, g, dc = (t[chunk].to(dtype).reshape(c * n, seq, t.shape[-1])
                                 for t in (q, k, v, grad_out, delta))
            qs, ks = qc * scale, kc * scale
            mask = rates_bias(rates[chunk], distance).reshape(c * n, seq, seq)
            p = torch.baddbmm(mask, qs, kc.transpose(-1, -2)).softmax(-1)
            dv[chunk] = torch.bmm(p.transpose(-1, -2), g).view(c, n, seq, d)
            ds = torch.bmm(g, vc.transpose(-1, -2)).sub_(dc).mul_(p)  # dS = P * (dP - delta)
            dq[chunk] = torch.bmm(ds, ks).view(c, n, seq, d)
            dk[chunk] = torch.bmm(ds.transpose(-1, -2), qs).view(c, n, seq, d)
            ds.mul_(distance)
            grad_rates[chunk] = (ds.sum(-1) + ds.sum(-2)).view(c, n, seq)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_rates


@dense_rates_attention_backward.register_fake
def _dense_rates_attention_backward_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rates: Tensor, distance: Tensor, out: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, n, seq, d = q.shape
    dq, dk, dv = (t.new_empty((b, seq, n, d)).transpose(1, 2) for t in (q, k, v))
    return dq, dk, dv, rates.new_empty((b, n, seq))


def _dense_setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs, output)


def _dense_backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
    q, k, v, rates, distance, out = ctx.saved_tensors
    return (*dense_rates_attention_backward(grad_out, q, k, v, rates, distance, out), None)


dense_rates_attention.register_autograd(_dense_backward, setup_context=_dense_setup_context)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs) -> Tensor:
    """Dense bias at head width d with a recomputing backward (``cdsf``); SDPA with the bias otherwise.

    For CDSF the bias ``(a_i + a_j) d(i, j)`` goes to SDPA's fused kernel as a mask and the backward
    recomputes the probabilities (:func:`dense_rates_attention`: no L x L tensor kept between forward and
    backward; the L x L work is done a few samples at a time).  ``fixed`` and ``none`` have a bias without gradient,
    which SDPA's fused kernels take forward and backward; the other modes run :func:`sdpa_attention`.
    Cheaper than ``augmented`` (width d instead of d + 1 + 2T) while the (N, L, L) working set is small
    (:func:`auto_backend_name`).
    """
    spec = decay_mode(decay.mode)
    if spec.rates is None:
        return sdpa_attention(q, k, v, decay)
    rates = spec.rates(decay)
    distance = decay.distance
    if distance is None:
        distance = eq.manhattan_distance(decay.height, decay.width, q.device)
    distance = distance.to(rates.dtype)
    return dense_rates_attention(q, k, v, rates, distance)


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
    "dense": dense_attention,
    "flex": flex_attention_backend,
}


# ------------------------------------------------------------------------------------- grid needs
# What a backend reads of the token grid besides the decay inputs, for a given decay variant: names of the
# :class:`DecayInputs` grid fields (``"codes"``: ``spatial_decay.threshold_codes``, ``"distance"``:
# ``spatial_decay.manhattan_distance``).  ``attention.grid.GridContext.build`` computes exactly these, once per
# grid and forward, and every layer of that forward shares them; a backend given none computes its own.
GridNeeds = Callable[[DecayMode], frozenset[str]]
GRID_FIELDS: tuple[str, ...] = ("codes", "distance")


def no_grid_needs(spec: DecayMode) -> frozenset[str]:
    """Nothing: the backend reads the grid through its size only (``math``, ``sdpa``, ``flex``)."""
    return frozenset()


def augmented_grid_needs(spec: DecayMode) -> frozenset[str]:
    """The threshold codes V of the low-rank identity, for the variants that have that form (``cdsf``, ``fixed``)."""
    return frozenset({"codes"}) if spec.low_rank else frozenset()


def dense_grid_needs(spec: DecayMode) -> frozenset[str]:
    """The distance matrix d(i, j), for variants whose bias is ``(a_i + a_j) d(i, j)`` (``cdsf``)."""
    return frozenset({"distance"}) if spec.rates is not None else frozenset()


BACKEND_GRID_NEEDS: dict[str, GridNeeds] = {
    "math": no_grid_needs,
    "sdpa": no_grid_needs,
    "augmented": augmented_grid_needs,
    "dense": dense_grid_needs,
    "flex": no_grid_needs,
}


def register_attention_backend(name: str, fn: AttentionBackend, grid_needs: GridNeeds = no_grid_needs) -> None:
    """Add a backend under ``name`` (the seam fused kernels plug into).

    ``grid_needs(spec)`` names the grid tensors (of :data:`GRID_FIELDS`) the backend reads for decay variant
    ``spec``; they reach it as the :class:`DecayInputs` fields of the same names, computed once per forward.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn) or not callable(grid_needs):
        raise ValueError(f"backend {name!r}: fn and grid_needs must be callables")
    ATTENTION_BACKENDS[name] = fn
    BACKEND_GRID_NEEDS[name] = grid_needs


def grid_needs(name: str, mode: str) -> frozenset[str]:
    """The grid tensors backend ``name`` (resolved, not ``"auto"``) reads for ``decay_mode`` ``mode``."""
    needs = frozenset(BACKEND_GRID_NEEDS.get(name, no_grid_needs)(decay_mode(mode)))
    unknown = needs - set(GRID_FIELDS)
    if unknown:
        raise ValueError(f"attention backend {name!r} needs unknown grid tensors {sorted(unknown)}; "
                         f"the grid provides {GRID_FIELDS}")
    return needs


def available_backends() -> tuple[str, ...]:
    """Names accepted by the ``attention_backend`` config field."""
    return (*ATTENTION_BACKENDS, "auto")


def check_backend_name(name: str, field: str = "attention_backend") -> str:
    """``name`` if it is a backend or ``"auto"``; else a ``ValueError`` naming ``field`` and the choices."""
    if not isinstance(name, str) or name not in available_backends():
        raise ValueError(f"{field} must be one of {available_backends()}, got {name!r}")
    return name


# On CPU the ``dense`` backend beat ``augmented`` at every size measured (S/2 heads, fwd+bwd: 1.6x faster at
# 256 tokens, 2.1x at 576, 2.2x at 1024; benchmarks/RESULTS.md); its backward holds a few (N, L, L) tensors
# per sample (25 MiB each for 6 heads at 1024 tokens), so above this many tokens `auto` keeps the O(L) form.
DENSE_MAX_TOKENS_CPU = 1024


def resolve_backend(name: str, device: torch.device, mode: str, tokens: int | None = None) -> AttentionBackend:
    """The backend function for ``name``; ``"auto"`` picks the fastest exact one for the device (and ``tokens``)."""
    name = resolve_backend_name(name, device, mode, tokens)
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention_backend {name!r}; choose one of {available_backends()}"
        ) from None


def resolve_backend_name(name: str, device: torch.device | str, mode: str, tokens: int | None = None) -> str:
    """``name`` itself, or for ``"auto"`` the backend :func:`auto_backend_name` picks."""
    return auto_backend_name(device, mode, tokens) if name == "auto" else name


def auto_backend_name(device: torch.device | str, mode: str, tokens: int | None = None) -> str:
    """The backend ``"auto"`` resolves to on ``device`` for ``decay_mode`` with ``tokens`` tokens per image.

    ``cdsf`` and ``fixed`` have an exact low-rank form: ``"augmented"`` (plain SDPA at width d + 1 + 2T, no
    L x L bias) on CUDA, where it runs on the flash / cuDNN kernels, and on CPU above
    :data:`DENSE_MAX_TOKENS_CPU` tokens or when ``tokens`` is not given.  On CPU with at most that many
    tokens, ``"dense"``: attention at width d with the bias as SDPA's mask and a recomputing backward,
    measured faster there (benchmarks/RESULTS.md).  ``none`` is plain SDPA; the variants without a fused
    form (``1d``, ``bidirectional``, ``decomposed``) use the dense ``"sdpa"`` path.
    """
    if not decay_mode(mode).low_rank:
        return "sdpa"
    if torch.device(device).type == "cpu" and tokens is not None and tokens <= DENSE_MAX_TOKENS_CPU:
        return "dense"
    return "augmented"
