"""Spatial Decay Attention (paper eq. 4-13): the one attention module every SDT model uses.

SDT-P (``SDTTransformer2DModel``) runs it on a fixed token grid per forward; the module itself builds
nothing that depends on the grid size except from the ``height``/``width`` it is given, so it runs on any
grid, square or not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import spatial_decay as eq
from ..attention.backends import AttentionBackend
from ..attention.modes import DecayInputs
from ..attention.modes import decay_mode as decay_mode_spec


class SpatialDecayAttention(nn.Module):
    """Spatial Decay Attention (eq. 4-13) with a pluggable attention backend."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        decay_mode: str = "cdsf",
        alpha: float = 0.1,
        gate_rank: int = 16,
        lpe_kernel_size: int = 5,
        use_rope: bool = True,
        fixed_decay_init: float = 2.0,
        fixed_decay_range: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.decay_mode = decay_mode
        self.alpha = alpha
        self.use_rope = use_rope
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fixed_decay_init = fixed_decay_init
        self.fixed_decay_range = fixed_decay_range
        spec = decay_mode_spec(decay_mode)
        # W_g (eq. 4): one output per head, or [W_g,H, W_g,W] for the decomposed decay (eq. 11).
        self.gate = nn.Linear(dim, spec.gate_outputs * num_heads) if spec.gate_outputs else None
        if spec.fixed_gamma:
            self.register_buffer("log_gamma", self.fixed_log_gamma(), persistent=False)
        else:
            self.log_gamma = None
        self.lpe = nn.Conv2d(dim, dim, lpe_kernel_size, padding=lpe_kernel_size // 2, groups=dim)
        self.gate_down = nn.Linear(dim, gate_rank, bias=False)  # W_u1
        self.gate_up = nn.Linear(gate_rank, dim, bias=False)  # W_u2
        self.proj = nn.Linear(dim, dim)

    def fixed_log_gamma(self) -> torch.Tensor:
        """RMT's per-head ``log gamma_h`` for ``decay_mode="fixed"`` (the non-persistent ``log_gamma`` buffer's value)."""
        return eq.rmt_log_gamma(self.num_heads, self.fixed_decay_init, self.fixed_decay_range)

    def decay_inputs(self, x: Tensor, height: int, width: int, codes: Tensor | None = None) -> DecayInputs:
        """Gates and constants the decay variant needs for input ``x`` (B, L, D).

        ``codes``: the grid's ``threshold_codes`` when already computed (the fused backend needs them).
        """
        decay = DecayInputs(self.decay_mode, height, width, self.alpha, log_gamma=self.log_gamma, codes=codes)
        if self.gate is None:
            return decay
        if decay_mode_spec(self.decay_mode).gate_outputs == 2:
            decay.gate_logits_h, decay.gate_logits_w = self.gate(x).float().chunk(2, dim=-1)
        else:
            decay.gates = eq.context_aware_gates(self.gate(x))  # eq. 4-5
        return decay

    def forward(
        self, x: Tensor, height: int, width: int, rope: tuple[Tensor, Tensor] | None, backend: AttentionBackend,
        codes: Tensor | None = None,
    ) -> Tensor:
        """Spatial Decay Attention of tokens ``x`` (B, L, D) on an ``height`` x ``width`` grid (eq. 4-13).

        Args:
            rope: ``spatial_decay.rope_tables`` (cos, sin), each (L, d), or None for no RoPE.
            backend: an attention backend ``(q, k, v, decay) -> out``.
            codes: optional ``spatial_decay.threshold_codes`` of the grid, shared by all layers.
        """
        b, seq, dim = x.shape
        qkv = self.qkv(x).reshape(b, seq, 3, self.num_heads, self.head_dim)  # token-major (B, L, 3, N, d)
        qk = qkv[:, :, :2]
        if self.use_rope and rope is not None:  # R(Q), R(K) together (eq. 13)
            cos, sin = rope
            qk = eq.apply_rope_tables(qk, cos[:, None, None], sin[:, None, None])
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, L, d) each
        v_tokens = qkv[:, :, 2]  # (B, L, N, d)
        attn = backend(q, k, v_tokens.transpose(1, 2), self.decay_inputs(x, height, width, codes))
        lpe = eq.local_position_encoding_tokens(v_tokens.reshape(b, seq, dim), self.lpe, height, width)
        gate_u = self.gate_up(torch.sigmoid(self.gate_down(x)))  # U = sigma(X W_u1) W_u2
        out = eq.spatial_decay_output(attn.transpose(1, 2).reshape(b, seq, dim), lpe, gate_u)  # (B, L, D)
        return self.proj(out)
