"""Spatial Decay Attention (paper eq. 4-13): the one attention module every SDT model uses.

SDT-P (``SDTTransformer2DModel``) and SDT-H (``SDTH``) run it on the token grid of one
:class:`~sdt_diffusion.attention.grid.GridContext`, built once per grid and forward by the model and passed to
every block: the grid size, the RoPE tables, the attention backend and the grid tensors that backend reads.  The
module builds nothing that depends on the grid size itself, so it runs on any grid, square or not.

Two forward paths compute the same function (tests compare them in float64, outputs and gradients):

* the default one makes few passes over memory: one GEMM for Q, K, V, the gate logits (W_g) and the output
  gate's down projection (W_u1) (their weights concatenated per call; the parameters and state-dict keys are
  those of the separate layers), RoPE as one in-place pass (``kernels.rope_qk``), V made contiguous once and
  shared by the attention and LPE, LPE through ``kernels.depthwise_conv_tokens``, and the attention output
  read in the (B, L, N, d) layout SDPA writes;
* ``reference_path = True`` (:func:`use_reference_path`) runs the layers one by one with the plain
  equations of ``attention.spatial_decay``: the readable form, kept to measure the fast one against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import kernels
from ..attention import spatial_decay as eq
from ..attention.grid import GridContext
from ..attention.modes import DecayInputs
from ..attention.modes import decay_mode as decay_mode_spec

# How the output gate U and the decay gates W_g start (SpatialDecayAttention.init_gates); the paper is silent.
OUTPUT_GATE_INITS = ("xavier", "unit")
DECAY_GATE_INITS = ("zero", "rmt")


def unit_output_gate_weight(shape: torch.Size | tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """``W_u2`` (D, r) whose rows sum to 2, so that ``sigma(0) W_u2 1 = 1``, with distinct columns.

    Equal columns would get equal gradients forever (the gate would stay rank 1); columns are paired as
    ``2/r + delta`` and ``2/r - delta`` with ``delta`` a multiple of 2^-12 below 2^-6, so for a power-of-two rank
    every entry and partial sum is exact in float32 and the gate is exactly 1.
    """
    dim, rank = shape
    weight = torch.full((dim, rank), 2.0 / rank, dtype=torch.float64)
    pairs = rank // 2
    delta = torch.randint(-64, 65, (dim, pairs), generator=generator, dtype=torch.float64) * 2.0**-12
    weight[:, 0 : 2 * pairs : 2] += delta
    weight[:, 1 : 2 * pairs : 2] -= delta
    return weight


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
        use_lpe: bool = True,
        use_output_gate: bool = True,
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
        # LPE(V) (eq. 13) and the output gate U (eq. 13) can each be switched off: without them the layer is
        # softmax(R(Q) R(K)^T / sqrt(d) + M) V followed by the output projection.  gate_rank=0 also builds no
        # gate (RMT's attention).
        if gate_rank < 0:
            raise ValueError(f"gate_rank must be >= 0 (0: no output gate), got {gate_rank}")
        self.lpe = nn.Conv2d(dim, dim, lpe_kernel_size, padding=lpe_kernel_size // 2, groups=dim) if use_lpe else None
        gated = use_output_gate and gate_rank > 0
        self.gate_down = nn.Linear(dim, gate_rank, bias=False) if gated else None  # W_u1
        self.gate_up = nn.Linear(gate_rank, dim, bias=False) if gated else None  # W_u2
        self.proj = nn.Linear(dim, dim)
        self.reference_path = False  # True: the plain layer-by-layer forward (see the module docstring)

    def init_gates(self, output_gate: str = "xavier", decay_gate: str = "zero",
                   generator: torch.Generator | None = None) -> None:
        """Start the output gate U and the decay gates W_g as chosen (the paper gives no initialisation).

        ``output_gate``: ``"xavier"`` leaves U's layers as the model initialised them (a small, random-signed
        factor at start); ``"unit"`` makes ``U = sigma(X W_u1) W_u2`` exactly 1 at start (W_u1 = 0, rows of
        W_u2 summing to 2; :func:`unit_output_gate_weight`).  ``decay_gate``: ``"zero"`` sets W_g = 0 and keeps
        its bias, so every head starts with ``G = log sigma(b)``; ``"rmt"`` sets W_g = 0 and the bias so that
        each head starts with RMT's decay per unit of distance, ``log gamma_h`` (``fixed_decay_init`` and
        ``fixed_decay_range`` set the schedule; CDSF's ``alpha`` is divided out).

        A tensor marked as loaded from a checkpoint (transformers' ``_is_hf_initialized``, set while
        ``from_pretrained`` runs a model's ``_init_weights``) is left as loaded.
        """
        if output_gate not in OUTPUT_GATE_INITS:
            raise ValueError(f"output_gate_init must be one of {list(OUTPUT_GATE_INITS)}, got {output_gate!r}")
        if decay_gate not in DECAY_GATE_INITS:
            raise ValueError(f"decay_gate_init must be one of {list(DECAY_GATE_INITS)}, got {decay_gate!r}")
        # the start values are computed on the CPU (also inside a ``torch.device("meta")`` block) and copied in
        with torch.no_grad(), torch.device("cpu"):
            if output_gate == "unit" and self.gate_down is not None:
                _set_unless_loaded(self.gate_down.weight, None)
                weight = self.gate_up.weight
                if not _loaded(weight):
                    weight.copy_(unit_output_gate_weight(weight.shape, generator))
            if self.gate is None:
                return
            _set_unless_loaded(self.gate.weight, None)
            if decay_gate == "rmt":
                per_unit = self.fixed_log_gamma()
                if self.decay_mode == "cdsf":  # M = alpha * G * d for equal gates (eq. 8)
                    if self.alpha <= 0:
                        raise ValueError("decay_gate_init='rmt' needs alpha > 0 with decay_mode='cdsf'")
                    per_unit = per_unit / self.alpha
                logits = eq.gate_logit_for_log_decay(per_unit)
                _set_unless_loaded(self.gate.bias, logits.repeat(self.gate.out_features // self.num_heads))

    def fixed_log_gamma(self) -> torch.Tensor:
        """RMT's per-head ``log gamma_h`` for ``decay_mode="fixed"`` (the non-persistent ``log_gamma`` buffer's value)."""
        return eq.rmt_log_gamma(self.num_heads, self.fixed_decay_init, self.fixed_decay_range)

    def decay_inputs(self, x: Tensor, height: int, width: int, codes: Tensor | None = None,
                     distance: Tensor | None = None) -> DecayInputs:
        """Gates and constants the decay variant needs for input ``x`` (B, L, D).

        ``codes``, ``distance``: the grid's ``threshold_codes`` / ``manhattan_distance`` when already computed
        (a :class:`GridContext` carries those its backend reads); a backend given none builds its own.
        """
        gate_logits = None if self.gate is None else self.gate(x)
        return self._decay_from_logits(gate_logits, height, width, codes, distance)

    def _input_projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(X W_qk, X W_v, X W_g, X W_u1)`` (B, L, .) views (``None`` for a part switched off); one GEMM when the
        weights allow it.

        The weights are concatenated per call (state-dict keys unchanged); when they differ in dtype or device
        (e.g. ``enable_layerwise_casting`` stores some in another dtype and casts them in hooks around each
        layer), the layers are called one by one so that their hooks run.
        """
        dim = self.qkv.out_features // 3
        extra = [layer for layer in (self.gate, self.gate_down) if layer is not None]
        layers = [self.qkv, *extra]
        weights = [layer.weight for layer in layers]
        dtype = weights[0].dtype
        same = all(w.dtype == dtype and w.device == x.device for w in weights) and not any(map(_hooked, layers))
        if extra and same and dtype.is_floating_point and dtype.itemsize >= 2 and (
            dtype == x.dtype or torch.is_autocast_enabled(x.device.type)
        ):
            biases = [self.qkv.bias] + ([self.gate.bias] if self.gate is not None else [])
            if self.gate_down is not None:
                biases.append(biases[0].new_zeros(self.gate_down.out_features))
            bias = torch.cat(biases)
            sizes = [2 * dim, dim] + [w.shape[0] for w in weights[1:]]
            parts = F.linear(x, torch.cat(weights), bias).split(sizes, dim=-1)
        else:
            parts = (*self.qkv(x).split([2 * dim, dim], dim=-1), *(layer(x) for layer in extra))
        qk, v, *rest = parts
        gate_logits = rest.pop(0) if self.gate is not None else None
        u = rest.pop(0) if self.gate_down is not None else None
        # The gate logits are copied out of the projection's output: autograd keeps the input of log sigma for
        # the backward pass, and a view would keep the whole (B, L, 3D + ...) output alive.
        return qk, v, (gate_logits.contiguous() if gate_logits is not None else None), u

    def _decay_from_logits(self, gate_logits: Tensor | None, height: int, width: int, codes: Tensor | None,
                           distance: Tensor | None) -> DecayInputs:
        decay = DecayInputs(self.decay_mode, height, width, self.alpha, log_gamma=self.log_gamma, codes=codes,
                            distance=distance)
        if gate_logits is None:
            return decay
        if decay_mode_spec(self.decay_mode).gate_outputs == 2:
            decay.gate_logits_h, decay.gate_logits_w = gate_logits.float().chunk(2, dim=-1)
        else:
            decay.gates = eq.context_aware_gates(gate_logits)  # eq. 4-5
        return decay

    def _lpe(self, v: Tensor, height: int, width: int) -> Tensor | None:
        """LPE(V) of contiguous token-major V (B, L, C) (eq. 13); ``None`` with LPE switched off."""
        lpe = self.lpe
        if lpe is None:
            return None
        if lpe.weight.dtype == v.dtype and lpe.weight.device == v.device and lpe.padding_mode == "zeros" and not _hooked(lpe):
            return kernels.depthwise_conv_tokens(v, self.lpe.weight, self.lpe.bias, height, width)
        return eq.local_position_encoding_tokens(v, self.lpe, height, width)  # e.g. layerwise casting hooks

    def _check_context(self, x: Tensor, context: GridContext) -> None:
        """A ``ValueError`` naming the mismatch when ``context`` was built for another grid, variant or head width."""
        if not isinstance(context, GridContext):
            raise ValueError(f"context must be a GridContext (GridContext.build), got {type(context).__name__}")
        if context.decay_mode != self.decay_mode:
            raise ValueError(f"the grid context was built for decay_mode {context.decay_mode!r}, but this layer's "
                             f"decay_mode is {self.decay_mode!r}")
        if x.shape[1] != context.tokens:
            raise ValueError(f"x has {x.shape[1]} tokens but the grid context is {context.height} x {context.width}")
        if self.use_rope and context.rope is not None and context.rope[0].shape[-1] != self.head_dim:
            raise ValueError(f"the grid context's RoPE tables are {context.rope[0].shape[-1]} wide, but this layer's "
                             f"head width is {self.head_dim}")

    def forward(self, x: Tensor, context: GridContext) -> Tensor:
        """Spatial Decay Attention of tokens ``x`` (B, L, D) on the grid of ``context`` (eq. 4-13).

        ``context`` (:meth:`GridContext.build`, once per grid and forward) carries the grid size, the RoPE
        tables, the attention backend and the grid tensors that backend reads, shared by all layers.
        """
        self._check_context(x, context)
        if self.reference_path:
            return self._forward_reference(x, context)
        b, seq, dim = x.shape
        n, d = self.num_heads, self.head_dim
        height, width = context.height, context.width
        qk, v, gate_logits, u = self._input_projections(x)
        qk = qk.unflatten(-1, (2, n, d))  # token-major (B, L, 2, N, d)
        if self.use_rope and context.rope is not None:  # R(Q), R(K) together (eq. 13)
            cos, sin = context.rope
            qk = kernels.rope_qk(qk, cos[:, None, None], sin[:, None, None])
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, L, d) views
        v = v.contiguous()  # (B, L, D): LPE's channels-last grid and, as a (B, N, L, d) view, the attention's V
        decay = self._decay_from_logits(gate_logits, height, width, context.codes, context.distance)
        attn = context.backend(q, k, v.view(b, seq, n, d).transpose(1, 2), decay)
        gate_u = None if u is None else self.gate_up(torch.sigmoid(u))  # U = sigma(X W_u1) W_u2
        # SDPA writes its output token-major, so this reshape is a view
        out = eq.spatial_decay_output(attn.transpose(1, 2).reshape(b, seq, dim), self._lpe(v, height, width), gate_u)
        return self.proj(out)

    def _forward_reference(self, x: Tensor, context: GridContext) -> Tensor:
        """The same function layer by layer with the plain equations (``reference_path = True``)."""
        b, seq, dim = x.shape
        height, width = context.height, context.width
        qkv = self.qkv(x).reshape(b, seq, 3, self.num_heads, self.head_dim)  # token-major (B, L, 3, N, d)
        qk = qkv[:, :, :2]
        if self.use_rope and context.rope is not None:  # R(Q), R(K) together (eq. 13)
            cos, sin = context.rope
            qk = eq.apply_rope_tables(qk, cos[:, None, None], sin[:, None, None])
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, L, d) each
        v_tokens = qkv[:, :, 2]  # (B, L, N, d)
        decay = self.decay_inputs(x, height, width, context.codes, context.distance)
        attn = context.backend(q, k, v_tokens.transpose(1, 2), decay)
        lpe = None if self.lpe is None else eq.local_position_encoding_tokens(
            v_tokens.reshape(b, seq, dim), self.lpe, height, width)
        gate_u = None if self.gate_down is None else self.gate_up(torch.sigmoid(self.gate_down(x)))  # U (eq. 13)
        out = eq.spatial_decay_output(attn.transpose(1, 2).reshape(b, seq, dim), lpe, gate_u)  # (B, L, D)
        return self.proj(out)


def _loaded(tensor: Tensor) -> bool:
    """``tensor`` holds weights read from a checkpoint (transformers marks them so while it initialises the rest)."""
    return bool(getattr(tensor, "_is_hf_initialized", False))


def _set_unless_loaded(tensor: Tensor, value: Tensor | None) -> None:
    """Copy ``value`` into ``tensor`` (zeros for ``None``) unless it was loaded from a checkpoint."""
    if _loaded(tensor):
        return
    if value is None:
        tensor.zero_()
    else:
        tensor.copy_(value)


def _hooked(module: nn.Module) -> bool:
    """The module's weights are managed by an offload or casting hook (accelerate's ``_hf_hook``, diffusers'
    hook registry): they are only valid inside the module's own call, so the fused paths must call it."""
    return hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook")


def use_reference_path(model: nn.Module, enabled: bool = True) -> None:
    """Run every :class:`SpatialDecayAttention` in ``model`` on its plain layer-by-layer path (or back)."""
    for module in model.modules():
        if isinstance(module, SpatialDecayAttention):
            module.reference_path = enabled
