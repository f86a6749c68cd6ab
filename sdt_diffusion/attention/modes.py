"""The decay variants of Spatial Decay Attention as one table of per-mode properties.

Each ``decay_mode`` is a :class:`DecayMode` in :data:`DECAY_MODE_TABLE`: what its gate projection
produces, which equation it is, and how each backend form of its bias is built (dense L x L bias,
exact low-rank Q/K features, FlexAttention ``score_mod``, or axial attention).  The model, the
backends and the tools ask this table instead of comparing mode names, so a new variant is one entry
here (plus its equation in :mod:`~sdt_diffusion.attention.spatial_decay`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from . import spatial_decay as eq


@dataclass
class DecayInputs:
    """What the decay of one attention call depends on.

    Attributes:
        mode: a key of :data:`DECAY_MODE_TABLE`.
        height, width: token grid.
        alpha: CDSF scale (eq. 8).
        gates: G = log sigma(X W_g), float32 (B, L, N), for modes whose gate has one output per head.
        gate_logits_h, gate_logits_w: F_H and F_W (B, L, N) for ``decomposed`` (eq. 11).
        log_gamma: (N,) RMT decay for ``fixed`` and ``fixed_decomposed``.
        codes: optional ``threshold_codes(height, width)`` (L, H + W - 2), computed once per grid and forward
            by ``grid.GridContext.build`` for the backends that declare them (``augmented``), so that no layer
            rebuilds them.
        distance: optional ``manhattan_distance(height, width)`` (L, L), likewise shared by the layers of one
            forward (the ``dense`` backend's bias is the rates times this matrix).
    """

    mode: str
    height: int
    width: int
    alpha: float = 0.1
    gates: Tensor | None = None
    gate_logits_h: Tensor | None = None
    gate_logits_w: Tensor | None = None
    log_gamma: Tensor | None = None
    codes: Tensor | None = None
    distance: Tensor | None = None


# ------------------------------------------------------------------------------ per-mode builders
def _cdsf_dense(decay: DecayInputs) -> Tensor:
    b, _, n = decay.gates.shape
    return eq.spatial_decay_bias(decay.gates.reshape(b, decay.height, decay.width, n), decay.alpha)


def _fixed_dense(decay: DecayInputs) -> Tensor:
    return eq.fixed_decay_bias(decay.log_gamma, decay.height, decay.width)


def _raster_dense(decay: DecayInputs) -> Tensor:
    return eq.raster_decay_bias(decay.gates)


def _bidirectional_dense(decay: DecayInputs) -> Tensor:
    return eq.bidirectional_decay_bias(decay.gates)


def _cdsf_rates(decay: DecayInputs) -> Tensor:
    """Per-token rates a (B, N, L) with ``M[i, j] = (a_i + a_j) d(i, j)``."""
    return eq.cdsf_rates(decay.gates.transpose(1, 2), decay.alpha)


def _cdsf_score_mod(decay: DecayInputs) -> eq.ScoreMod:
    g = decay.gates.transpose(1, 2).contiguous()
    return eq.cdsf_score_mod(g, g.clone(), decay.width, decay.alpha)


def _fixed_score_mod(decay: DecayInputs) -> eq.ScoreMod:
    return eq.fixed_score_mod(eq.upcast(decay.log_gamma).contiguous(), decay.width)


def _raster_score_mod(decay: DecayInputs) -> eq.ScoreMod:
    exclusive, _ = eq.gate_prefix_sums(decay.gates)
    return eq.prefix_score_mod(exclusive.contiguous(), exclusive.clone())


def _bidirectional_score_mod(decay: DecayInputs) -> eq.ScoreMod:
    exclusive, inclusive = eq.gate_prefix_sums(decay.gates)
    return eq.bidirectional_score_mod(exclusive.contiguous(), exclusive.clone(), inclusive.contiguous(),
                                      inclusive.clone())


def _decomposed_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs, attend) -> Tensor:
    return eq.decomposed_attention(q, k, v, decay.gate_logits_h, decay.gate_logits_w, decay.height, decay.width,
                                   attend=attend)


def _fixed_decomposed_attention(q: Tensor, k: Tensor, v: Tensor, decay: DecayInputs, attend) -> Tensor:
    return eq.fixed_decomposed_attention(q, k, v, decay.log_gamma, decay.height, decay.width, attend=attend)


# ------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class DecayMode:
    """Properties of one decay variant.

    Attributes:
        name: the ``decay_mode`` config value.
        equation: where the paper (or RMT) defines it.
        gate_outputs: outputs of the gate projection W_g per head: 0 (no learned gate), 1 (G, eq. 4-5)
            or 2 (F_H and F_W of the decomposed decay, eq. 11).
        uses_alpha: the bias is scaled by ``alpha`` (eq. 8).
        fixed_gamma: the bias uses RMT's per-head constants ``log gamma_h`` (no learned gate).
        dense_bias: builds the (B, N, L, L) / (N, L, L) bias; None when the mode has none (``none``) or
            is not a single L x L bias (``decomposed``).
        rates: per-token rates ``a`` (B, N, L) with ``M[i, j] = (a_i + a_j) d(i, j)``, the exact low-rank
            form the ``augmented`` backend uses; None otherwise.
        score_mod: the FlexAttention ``score_mod`` builder; None for modes FlexAttention does not run.
        axial: attention itself is replaced (``decomposed``, ``fixed_decomposed``: row then column attention).
    """

    name: str
    equation: str
    gate_outputs: int = 0
    uses_alpha: bool = False
    fixed_gamma: bool = False
    dense_bias: Callable[[DecayInputs], Tensor] | None = None
    rates: Callable[[DecayInputs], Tensor] | None = None
    score_mod: Callable[[DecayInputs], eq.ScoreMod] | None = None
    axial: Callable[..., Tensor] | None = None

    @property
    def low_rank(self) -> bool:
        """The decay is one L x L bias with an exact low-rank form (Q/K augmentation, no L x L tensor)."""
        return (self.rates is not None or self.fixed_gamma) and self.axial is None

    @property
    def content_dependent(self) -> bool:
        """The decay depends on the tokens (a learned gate), so its maps change from image to image."""
        return self.gate_outputs > 0

    @property
    def has_distance_map(self) -> bool:
        """The decay is a single L x L bias that can be drawn per query token."""
        return self.dense_bias is not None


DECAY_MODE_TABLE: dict[str, DecayMode] = {
    mode.name: mode
    for mode in (
        DecayMode("none", "no decay (eq. 3)"),
        DecayMode("fixed", "RMT's Manhattan decay d(i, j) log gamma_h", fixed_gamma=True, dense_bias=_fixed_dense,
                  score_mod=_fixed_score_mod),
        DecayMode("1d", "eq. 6 (raster order, symmetric)", gate_outputs=1, dense_bias=_raster_dense,
                  score_mod=_raster_score_mod),
        DecayMode("bidirectional", "eq. 6, forward and backward scans", gate_outputs=1,
                  dense_bias=_bidirectional_dense, score_mod=_bidirectional_score_mod),
        DecayMode("decomposed", "eq. 11-12", gate_outputs=2, axial=_decomposed_attention),
        DecayMode("fixed_decomposed", "RMT's decomposed decay: along W with gamma_h^|dw|, then along H with "
                  "gamma_h^|dh|", fixed_gamma=True, axial=_fixed_decomposed_attention),
        DecayMode("cdsf", "eq. 8-9", gate_outputs=1, uses_alpha=True, dense_bias=_cdsf_dense, rates=_cdsf_rates,
                  score_mod=_cdsf_score_mod),
    )
}
DECAY_MODES: tuple[str, ...] = tuple(DECAY_MODE_TABLE)


def decay_mode(name: str) -> DecayMode:
    """The :class:`DecayMode` called ``name``; a ``ValueError`` naming the choices otherwise."""
    try:
        return DECAY_MODE_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"decay_mode must be one of {DECAY_MODES}, got {name!r}") from None


__all__ = ["DECAY_MODES", "DECAY_MODE_TABLE", "DecayInputs", "DecayMode", "decay_mode"]
