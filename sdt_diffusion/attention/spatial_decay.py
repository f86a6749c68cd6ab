"""The equations of Spatial Decay Attention, one small function each.

Everything here is written from "Learning Spatial Decay for Vision Transformers"
(Mao et al., arXiv 2508.09525); the equation number stands beside each function.
Shapes use B = batch, N = heads, H x W = token grid, L = H * W (row-major order),
d = head width.  Decay biases are additive logits of shape (B, N, L, L) or (N, L, L).

Variants (``decay_mode`` of :class:`~sdt_diffusion.SDTTransformer2DModel`):

====================  ======================================================  ====================================
mode                  bias M[i, j]                                             function
====================  ======================================================  ====================================
``none``              0                                                        --
``fixed``             d(i, j) * log(gamma_h)                     (RMT)          :func:`fixed_decay_bias`
``1d``                sum of raster-order gates between i and j  (eq. 6)       :func:`raster_decay_bias`
``bidirectional``     mean of forward- and backward-scan 1D decay (eq. 6)      :func:`bidirectional_decay_bias`
``decomposed``        row then column attention with 1D decays   (eq. 11-12)  :func:`decomposed_attention`
``fixed_decomposed``  row then column attention, |dw| and |dh| * log(gamma_h)  :func:`fixed_decomposed_attention`
                      (RMT's decomposed decay)
``cdsf``              -|1/2 (G_i + G_j) d(i, j) alpha|           (eq. 7-9)     :func:`spatial_decay_bias`
====================  ======================================================  ====================================

Fused forms (no L x L tensor, used by the ``augmented`` and ``flex`` backends): the exact low-rank
identity ``d(i, j) = K - 1/2 V_i . V_j`` (:func:`threshold_codes`) writes CDSF and the fixed decay as a
dot product of extra query and key dims (:func:`decay_query_features`, :func:`decay_key_features`,
:func:`fixed_query_features` against the codes); the ``*_score_mod`` functions compute the
bias per (query, key) index pair inside FlexAttention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it already is (decay arithmetic never runs in half precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ----------------------------------------------------------------------------- gates
def context_aware_gates(gate_logits: Tensor) -> Tensor:
    """Bounded decay strengths ``G = log sigma(F)``, ``F = X W_g`` (eq. 4-5), at least float32, <= 0."""
    return F.logsigmoid(upcast(gate_logits))


# ----------------------------------------------------------------------------- geometry
def grid_coordinates(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Integer (row, column) coordinates of the L = H*W tokens in row-major order, shape (L, 2)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([rows, cols], dim=-1)


def manhattan_distance(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """``d(i, j) = |h_i - h_j| + |w_i - w_j|`` (eq. 7), float32, shape (L, L)."""
    p = grid_coordinates(height, width, device).float()
    return (p[:, None, :] - p[None, :, :]).abs().sum(-1)


# ----------------------------------------------------------------------------- decay biases
def spatial_decay_bias(gates: Tensor, alpha: float = 0.1) -> Tensor:
    """Content-dependent spatial fusion (CDSF), eq. 8-9.

    ``M[i, j] = -| 1/2 (G_i + G_j) * d(i, j) * alpha |`` per head.

    Args:
        gates: G, already log-sigmoided, shape (B, H, W, N).
        alpha: the scale alpha of eq. 8 (paper default 0.1).

    Returns:
        The dense bias M of shape (B, N, H*W, H*W), row-major token order.
    """
    if gates.dim() != 4:
        raise ValueError(f"gates must have shape (B, H, W, N), got {tuple(gates.shape)}")
    b, h, w, n = gates.shape
    g = gates.reshape(b, h * w, n).transpose(1, 2)  # (B, N, L)
    dist = manhattan_distance(h, w, gates.device).to(g.dtype)  # eq. 7
    combined = 0.5 * (g[:, :, :, None] + g[:, :, None, :]) * dist * alpha  # eq. 8
    return -combined.abs()  # eq. 9


def rmt_log_gamma(num_heads: int, initial_value: float = 2.0, heads_range: float = 4.0) -> Tensor:
    """RMT's per-head decay ``log gamma_h = log(1 - 2^(-init - range * h / N))``."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -initial_value - heads_range * h / num_heads)).float()


def gate_logit_for_log_decay(log_decay: Tensor) -> Tensor:
    """The gate logit ``F`` with ``log sigma(F) = log_decay`` (< 0): ``F = log p - log(1 - p)``, ``p = e^log_decay``.

    Used to start the context-aware gates (eq. 4-5) at a chosen decay, e.g. RMT's per-head ``log gamma_h``.
    """
    log_decay = log_decay.double()
    if not bool((log_decay < 0).all()):
        raise ValueError(f"a gate's decay log sigma(F) is negative; got {log_decay.tolist()}")
    return (log_decay - torch.log(-torch.expm1(log_decay))).float()


def fixed_axial_decay_bias(log_gamma: Tensor, size: int) -> Tensor:
    """RMT's 1D decay along one axis of ``size`` tokens: ``M[a, b] = |a - b| * log gamma_h``, shape (N, size, size).

    Source: RMT's ``RetNetRelPos2d.generate_1d_decay`` (qhfan/RMT, ``classfication_release/RMT.py``).
    """
    log_gamma = upcast(log_gamma)
    index = torch.arange(size, device=log_gamma.device, dtype=log_gamma.dtype)
    return (index[:, None] - index[None, :]).abs()[None] * log_gamma[:, None, None]


def fixed_decay_bias(log_gamma: Tensor, height: int, width: int) -> Tensor:
    """Data-independent Manhattan decay of RMT: ``M[i, j] = d(i, j) * log gamma_h``, shape (N, L, L)."""
    log_gamma = upcast(log_gamma)
    dist = manhattan_distance(height, width, log_gamma.device).to(log_gamma.dtype)
    return dist[None] * log_gamma[:, None, None]


def gate_prefix_sums(gates: Tensor) -> tuple[Tensor, Tensor]:
    """Exclusive and inclusive prefix sums ``E_i = sum_{k<i} g_k``, ``I_i = sum_{k<=i} g_k`` of gates (B, L, N), as (B, N, L)."""
    g = upcast(gates).transpose(1, 2)
    inclusive = g.cumsum(-1)
    return inclusive - g, inclusive


def raster_decay_bias(gates: Tensor) -> Tensor:
    """1D decay in raster order, eq. 6 made symmetric.

    ``M[i, j] = sum_{k=min(i,j)}^{max(i,j)-1} g_k`` over the flattened (row-major) token sequence,
    with ``g = G <= 0`` of shape (B, L, N).  Returns (B, N, L, L).
    """
    exclusive, _ = gate_prefix_sums(gates)
    # sum_{k=a}^{b-1} g_k = C[b] - C[a] with C the exclusive prefix sum; every g_k <= 0.
    return -(exclusive[..., :, None] - exclusive[..., None, :]).abs()


def bidirectional_decay_bias(gates: Tensor) -> Tensor:
    """Bidirectional 1D decay: mean of a forward and a backward raster scan of eq. 6.

    Forward scan: gates of the tokens ``min(i,j) .. max(i,j)-1``; backward scan (the sequence
    reversed): gates of ``min(i,j)+1 .. max(i,j)``.  ``g = G`` of shape (B, L, N); returns (B, N, L, L).
    """
    exclusive, inclusive = gate_prefix_sums(gates)
    forward = -(exclusive[..., :, None] - exclusive[..., None, :]).abs()
    backward = -(inclusive[..., :, None] - inclusive[..., None, :]).abs()
    return 0.5 * (forward + backward)


def axial_decay_bias(gate_logits: Tensor) -> Tensor:
    """1D decay along one axis for decomposed attention, eq. 11.

    ``M[a, b] = - sum_{k=min(a,b)}^{max(a,b)-1} |log sigma(F[k])|`` for the n tokens of one row
    (or column).  ``gate_logits`` F has shape (..., n, N); returns (..., N, n, n).
    """
    g = F.logsigmoid(upcast(gate_logits)).abs().transpose(-1, -2)  # (..., N, n)
    exclusive = g.cumsum(-1) - g
    return -(exclusive[..., :, None] - exclusive[..., None, :]).abs()


# ----------------------------------------------------------------------------- exact low-rank decay
# Identity (the Manhattan distance of eq. 7 written with threshold codes, re-centred): for integers x, y in [0, n) and the threshold codes
# v_t(x) = 2 * 1[x < t] - 1 in {-1, +1}, t = 1 .. n-1,
#     |x - y| = sum_t (u_t(x) - u_t(y))^2 = sum_t 1/2 (1 - v_t(x) v_t(y)),   u_t = (1 + v_t) / 2,
# so with V_i = [v(h_i), v(w_i)] (T = H + W - 2 entries) and K = T / 2:
#     d(i, j) = K - 1/2 V_i . V_j                                               (eq. 7, rank T + 1)
# A decay M[i, j] = (a_i + a_j) d(i, j) with per-token rates a (CDSF: a = alpha/2 * G, eq. 8-9, since
# G <= 0 and d >= 0 remove the |.|) is then, up to the term a_i K that depends on i only and cancels
# in the row softmax,
#     M[i, j] = a_j K - 1/2 a_j V_i . V_j - 1/2 a_i V_i . V_j = [K, -1/2 V_i, -1/2 a_i V_i] . [a_j, a_j V_j, V_j],
# a dot product of a query-side and a key-side vector: appended to Q and K they turn the biased
# attention into plain attention.  Every feature is K, +-1/2, +-a or +-a/2: once the rates a are rounded
# to a low precision, all products are exact, so bf16 perturbs only the rates (as rounding the dense
# bias to bf16 does), never the cancellation between the terms (docs/performance.md).


def threshold_codes(height: int, width: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """``V_i = [v_1(h_i) .. v_{H-1}(h_i), v_1(w_i) .. v_{W-1}(w_i)]``, ``v_t(x) = 2*1[x < t] - 1``.

    Shape (L, H + W - 2), entries +-1, such that ``d(i, j) = (H + W - 2)/2 - 1/2 V_i . V_j`` (eq. 7).
    """
    pos = grid_coordinates(height, width, device)
    rows = pos[:, :1] < torch.arange(1, height, device=device)  # u_t(h_i), t = 1 .. H-1
    cols = pos[:, 1:] < torch.arange(1, width, device=device)  # u_t(w_i), t = 1 .. W-1
    return torch.cat([rows, cols], dim=-1).to(dtype) * 2 - 1


def cdsf_rates(gates: Tensor, alpha: float = 0.1) -> Tensor:
    """Per-token decay rates ``a_i = alpha/2 * G_i`` of CDSF: ``M[i, j] = (a_i + a_j) d(i, j)`` (eq. 8-9, G <= 0)."""
    return 0.5 * alpha * gates


def decay_query_features(rates: Tensor, codes: Tensor) -> Tensor:
    """Query side ``[K, -1/2 V_i, -1/2 a_i V_i]`` of ``M[i, j] = (a_i + a_j) d(i, j)`` (identity above).

    Args:
        rates: a (..., L), e.g. (B, N, L); the features take its dtype.
        codes: V from :func:`threshold_codes`, (L, T).

    Returns:
        (..., L, 1 + 2T); its dot product with :func:`decay_key_features` of the same rates is M up to
        a term that depends on i only.
    """
    a = rates[..., None]
    v = codes.to(rates.dtype).expand(*rates.shape, codes.shape[-1])
    half_t = torch.full_like(a, 0.5 * codes.shape[-1])
    return torch.cat([half_t, -0.5 * v, -0.5 * a * v], dim=-1)


def decay_key_features(rates: Tensor, codes: Tensor) -> Tensor:
    """Key side ``[a_j, a_j V_j, V_j]`` of ``M[i, j] = (a_i + a_j) d(i, j)`` (see :func:`decay_query_features`).

    rates: a (..., L); codes: V (L, T).  Returns (..., L, 1 + 2T).
    """
    a = rates[..., None]
    v = codes.to(rates.dtype).expand(*rates.shape, codes.shape[-1])
    return torch.cat([a, a * v, v], dim=-1)


def fixed_query_features(rates: Tensor, codes: Tensor) -> Tensor:
    """Query side ``-1/2 c_h V_i`` of a fixed decay ``M[i, j] = c_h d(i, j)`` (RMT: ``c_h = log gamma_h``), (N, L, T).

    ``c_h d(i, j) = c_h K - 1/2 c_h V_i . V_j``; the first term is constant per head and cancels in the
    softmax, the second is this vector dotted with the key side ``V_j`` (the codes themselves).  rates: c (N,).
    """
    return -0.5 * rates[:, None, None] * codes.to(rates.dtype)



# ----------------------------------------------------------------------------- score modifications
# FlexAttention form: the bias is computed per (query, key) pair inside the kernel from token
# indices, so nothing of size L x L is stored.  Each ``*_score_mod`` returns a function
# ``(score, b, h, q_idx, kv_idx) -> score + M[b, h, q_idx, kv_idx]``.  A captured tensor is read
# once per score_mod (a FlexAttention restriction), hence the separate query-side and key-side tensors.
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def index_manhattan_distance(q_idx: Tensor, kv_idx: Tensor, width: int) -> Tensor:
    """``d(i, j) = |h_i - h_j| + |w_i - w_j|`` (eq. 7) from row-major token indices."""
    return (q_idx // width - kv_idx // width).abs() + (q_idx % width - kv_idx % width).abs()


def cdsf_score_mod(gates_q: Tensor, gates_k: Tensor, width: int, alpha: float = 0.1) -> ScoreMod:
    """CDSF (eq. 8-9): ``score - |1/2 (G_i + G_j) d(i, j) alpha|``; gates_q, gates_k: G as (B, N, L), equal values."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dist = index_manhattan_distance(q_idx, kv_idx, width)
        return score - (0.5 * alpha * (gates_q[b, h, q_idx] + gates_k[b, h, kv_idx]) * dist).abs()

    return score_mod


def fixed_score_mod(log_gamma: Tensor, width: int) -> ScoreMod:
    """RMT's fixed decay: ``score + d(i, j) log(gamma_h)``; log_gamma: (N,)."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + index_manhattan_distance(q_idx, kv_idx, width) * log_gamma[h]

    return score_mod


def prefix_score_mod(prefix_q: Tensor, prefix_k: Tensor) -> ScoreMod:
    """1D decay (eq. 6, symmetric): ``score - |C_i - C_j|`` with C a prefix sum of the gates, (B, N, L)."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - (prefix_q[b, h, q_idx] - prefix_k[b, h, kv_idx]).abs()

    return score_mod


def bidirectional_score_mod(exclusive_q: Tensor, exclusive_k: Tensor, inclusive_q: Tensor,
                            inclusive_k: Tensor) -> ScoreMod:
    """Bidirectional 1D decay: ``score - 1/2 (|E_i - E_j| + |I_i - I_j|)``, E/I exclusive/inclusive prefix sums."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        forward = (exclusive_q[b, h, q_idx] - exclusive_k[b, h, kv_idx]).abs()
        backward = (inclusive_q[b, h, q_idx] - inclusive_k[b, h, kv_idx]).abs()
        return score - 0.5 * (forward + backward)

    return score_mod


# ----------------------------------------------------------------------------- attention
def attention_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """``softmax(Q K^T / sqrt(d) + M) V`` with an explicit softmax in (at least) float32 (eq. 3, 10).

    q, k, v: (B, N, L, d); bias broadcastable to (B, N, L, L) or None.
    """
    scores = (upcast(q) @ upcast(k).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    return (scores.softmax(-1) @ upcast(v)).to(v.dtype)


def axial_attention(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor, height: int, width: int,
                    attend=attention_with_bias) -> Tensor:
    """``O = Attn_H(Attn_W V)``: attention along W within each row, then along H within each column on its output.

    q, k, v: (B, N, L, d) in row-major order; ``bias_w`` broadcastable to (B, N, H, W, W) (one W x W bias per
    row), ``bias_h`` to (B, N, W, H, H) (one H x H bias per column).  ``attend(q, k, v, bias)`` computes one
    biased attention (plain or SDPA).
    """
    b, n, _, d = q.shape

    def rows(t: Tensor) -> Tensor:  # (B, N, L, d) -> (B, N, H, W, d)
        return t.reshape(b, n, height, width, d)

    def cols(t: Tensor) -> Tensor:  # (B, N, H, W, d) -> (B, N, W, H, d)
        return t.transpose(2, 3)

    out_w = attend(rows(q), rows(k), rows(v), bias_w)  # rows are independent sequences of length W
    out_h = attend(cols(rows(q)), cols(rows(k)), cols(out_w), bias_h)  # columns: sequences of length H
    return cols(out_h).reshape(b, n, height * width, d)


def decomposed_attention(
    q: Tensor, k: Tensor, v: Tensor, gate_logits_h: Tensor, gate_logits_w: Tensor, height: int, width: int,
    attend=attention_with_bias,
) -> Tensor:
    """Decomposed 2D decay, eq. 11-12: ``O = Attn_H(Attn_W V)``.

    Attention along W within each row with the row decay of ``F_W``, then along H within each
    column with the column decay of ``F_H``.  q, k, v: (B, N, L, d); gate logits F_H, F_W: (B, L, N).
    ``attend(q, k, v, bias)`` computes one biased attention (plain or SDPA).
    """
    b, n = q.shape[:2]
    f_w = gate_logits_w.reshape(b, height, width, n)  # (B, H, W, N)
    m_w = axial_decay_bias(f_w).transpose(1, 2)  # (B, H, N, W, W) -> (B, N, H, W, W)
    f_h = gate_logits_h.reshape(b, height, width, n).transpose(1, 2)  # (B, W, H, N)
    m_h = axial_decay_bias(f_h).transpose(1, 2)  # (B, N, W, H, H)
    return axial_attention(q, k, v, m_w, m_h, height, width, attend)


def fixed_decomposed_attention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, height: int, width: int,
                               attend=attention_with_bias) -> Tensor:
    """RMT's decomposed decay: ``O = Attn_H(Attn_W V)`` with the data-independent biases ``|w_a - w_b| log gamma_h``
    along each row and ``|h_a - h_b| log gamma_h`` along each column.

    Source: RMT's ``VisionRetentionChunk`` (qhfan/RMT, ``classfication_release/RMT.py``): attention along W, then
    along H on the first pass's output, with the masks of ``RetNetRelPos2d`` (``chunkwise_recurrent=True``).
    q, k, v: (B, N, L, d); log_gamma: (N,) from :func:`rmt_log_gamma`.
    """
    m_w = fixed_axial_decay_bias(log_gamma, width)[:, None]  # (N, 1, W, W): the same bias for every row
    m_h = fixed_axial_decay_bias(log_gamma, height)[:, None]  # (N, 1, H, H): the same bias for every column
    return axial_attention(q, k, v, m_w, m_h, height, width, attend)


# ----------------------------------------------------------------------------- position
def rope_2d_angles(height: int, width: int, head_dim: int, base: float = 10000.0,
                   device: torch.device | str | None = None) -> Tensor:
    """Rotation angles of axial 2D RoPE, shape (L, head_dim / 2).

    Half of the rotary width encodes the row, half the column: the first ``head_dim/4`` angle
    slots are ``h * theta_k``, the last ``head_dim/4`` are ``w * theta_k``,
    ``theta_k = base^(-k / (head_dim/4))``.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got attention_head_dim={head_dim}")
    quarter = head_dim // 4
    theta = base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    pos = grid_coordinates(height, width, device).double()
    return torch.cat([pos[:, :1] * theta, pos[:, 1:] * theta], dim=-1).float()


def rope_1d_angles(height: int, width: int, head_dim: int, base: float = 10000.0,
                   device: torch.device | str | None = None) -> Tensor:
    """Rotation angles of RMT's 1D RoPE on the raster index, shape (L, head_dim / 2).

    Token ``l = h * W + w`` (row-major) rotates slot k by ``l * theta_k`` with
    ``theta_k = base^(-k / (head_dim/2 - 1))``, k = 0 .. head_dim/2 - 1 (``base^-linspace(0, 1, head_dim/2)``):
    the ``angle`` buffer and ``sin``/``cos`` of RMT's ``RetNetRelPos2d`` (qhfan/RMT, ``classfication_release/RMT.py``).
    RMT rotates the interleaved pairs (2k, 2k + 1) (``theta_shift``); :func:`apply_rope` rotates (k, k + d/2) with the
    same angle, the same function up to one fixed permutation of each head's query and key channels.
    """
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"1D RoPE needs an even head width, got {head_dim}")
    half = head_dim // 2
    theta = base ** -torch.linspace(0.0, 1.0, half, dtype=torch.float64, device=device)
    index = torch.arange(height * width, dtype=torch.float64, device=device)
    return (index[:, None] * theta[None, :]).float()


# RoPE layouts (``rope_layout``): name -> the function of this module that gives its angles
# ``(height, width, head_dim, base, device) -> (L, head_dim / 2)`` (looked up at call time), and the multiple the
# head width must be of.
ROPE_LAYOUTS: dict[str, str] = {"2d": "rope_2d_angles", "1d": "rope_1d_angles"}
ROPE_HEAD_MULTIPLE: dict[str, int] = {"2d": 4, "1d": 2}


def check_rope_layout(layout: str) -> str:
    """``layout`` if it is a key of :data:`ROPE_LAYOUTS`; else a ``ValueError`` naming the choices."""
    if not isinstance(layout, str) or layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout must be one of {tuple(ROPE_LAYOUTS)}, got {layout!r}")
    return layout


def rope_angles(layout: str, height: int, width: int, head_dim: int, base: float = 10000.0,
                device: torch.device | str | None = None) -> Tensor:
    """Angles of RoPE layout ``layout``: ``"2d"`` (:func:`rope_2d_angles`) or ``"1d"`` (:func:`rope_1d_angles`)."""
    # Plain calls (not a table of functions): torch.compile traces them, and a patched module attribute is honoured.
    if check_rope_layout(layout) == "1d":
        return rope_1d_angles(height, width, head_dim, base, device)
    return rope_2d_angles(height, width, head_dim, base, device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding R(x) (eq. 13): dims k and k + d/2 rotate together by angle k.

    x: (..., L, d); cos, sin: (L, d/2).
    """
    x1, x2 = upcast(x).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def rope_tables(angles: Tensor) -> tuple[Tensor, Tensor]:
    """Full-width tables ``([cos, cos], [-sin, sin])``, each (L, d), of :func:`rope_2d_angles` for :func:`apply_rope_tables`."""
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope_tables(x: Tensor, cos_full: Tensor, sin_signed: Tensor) -> Tensor:
    """R(x) of :func:`apply_rope` with two products instead of four (eq. 13).

    ``R(x) = x * [cos, cos] + [x2, x1] * [-sin, sin]`` for ``x = [x1, x2]``; since IEEE negation is exact
    and ``a + (-b) = a - b``, the result is bitwise that of :func:`apply_rope`.  x: (..., d); tables from
    :func:`rope_tables`, broadcastable to x.
    """
    x_up = upcast(x)
    x1, x2 = x_up.chunk(2, dim=-1)
    return (x_up * cos_full + torch.cat([x2, x1], dim=-1) * sin_signed).to(x.dtype)



def local_position_encoding_tokens(v: Tensor, conv: torch.nn.Conv2d, height: int, width: int) -> Tensor:
    """LPE(V), a depthwise convolution over V laid out on the 2D grid (eq. 13), for token-major V (B, L, C) -> (B, L, C), C = heads * d.

    The convolution runs in channels-last layout, which is V's own (token, channel) order: no transposes
    around it, and the depthwise kernels are faster in that layout on CPU.
    """
    b, seq, channels = v.shape
    grid = v.reshape(b, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W) view
    grid = grid.contiguous(memory_format=torch.channels_last)
    return conv(grid).permute(0, 2, 3, 1).reshape(b, seq, channels)


def spatial_decay_output(attn: Tensor, lpe: Tensor | None, gate_u: Tensor | None) -> Tensor:
    """``O = U * [softmax(...) V + LPE(V)]`` (eq. 13) with the low-rank gate U = sigma(X W_u1) W_u2.

    A part switched off is ``None``: without a gate (RMT's attention) ``O = softmax(...) V + LPE(V)``; without
    LPE ``O = U * softmax(...) V``; without both, plain attention (DiT's).
    """
    out = attn if lpe is None else attn + lpe
    return out if gate_u is None else gate_u * out
