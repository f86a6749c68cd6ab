"""SDT-H: the paper's hierarchical Spatial Decay Transformer for classification and dense features.

Four stages at strides 4 / 8 / 16 / 32 (paper, Method; the macro design follows RMT's released
classification code, which the paper says it is aligned with):

* stem: four 3x3 convolutions with BatchNorm (GELU between them), output stride 4;
* between stages: a 3x3 stride-2 convolution and BatchNorm;
* block: ``x + DWConv3x3(x)`` (conditional position encoding), then pre-LN Spatial Decay Attention and a
  pre-LN FFN ``fc -> GELU -> h + DWConv3x3(h) -> fc``, each with drop path (linear in depth) and an
  optional layer scale;
* head: ``Linear -> BatchNorm -> Swish -> average pool -> Linear``.

The attention is :class:`~sdt_diffusion.models.SpatialDecayAttention`, the same module SDT-P uses
(eq. 4-13), with one decay mode per stage (default: decomposed, eq. 11-12, in stages 1-2 and CDSF,
eq. 8-9, in stages 3-4).

The same class builds RMT (Fan et al., "RMT: Retentive Networks Meet Vision Transformers"), the paper's baseline,
from RMT's own choices where they differ: the presets ``RMT-T`` / ``RMT-S`` / ``RMT-B`` (RMT's released
``RMT_T3`` / ``RMT_S`` / ``RMT_M2``) have the data-independent decay in every stage (``fixed_decomposed`` where
RMT decomposes, ``fixed`` elsewhere), RoPE on the raster index (``rope_layout="1d"``) and no output gate
(``gate_rank=0``); their parameter counts equal those of RMT's code.  Each stage's :class:`~sdt_diffusion.attention.grid.GridContext` (RoPE tables, the
attention backend and the grid tensors it reads) is built once per stage and forward from the actual
feature-map size, so any input whose sides are multiples of 32 works.

:class:`SDTH` is the one implementation.  It carries timm's model API (``forward_features``,
``forward_head``, ``forward_intermediates``, ...) without importing timm; :mod:`.sdt_h_timm` registers it
with timm and :mod:`.sdt_h_transformers` wraps it as transformers models.  Both take the keyword
arguments of :class:`SDTH` under the same names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..attention.backends import check_backend_name
from ..attention.grid import GridContext
from ..attention.modes import decay_mode as get_decay_mode
from ..attention.spatial_decay import ROPE_HEAD_MULTIPLE, check_rope_layout
from .spatial_decay_attention import DECAY_GATE_INITS, OUTPUT_GATE_INITS, SpatialDecayAttention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's text: decomposed decay (eq. 11-12) in stages 1-2, full CDSF (eq. 8-9) in stages 3-4.
DEFAULT_DECAY_MODES: tuple[str, ...] = ("decomposed", "decomposed", "cdsf", "cdsf")
# Presets.  Widths, depths, heads, MLP ratios, layer scale and the fixed-decay schedule are those of RMT's
# released models (RMT_T3 / RMT_S / RMT_M2); drop path is the paper's stochastic depth (0.1 / 0.15 / 0.4).
# gate_rank (the rank of U = sigma(X W_u1) W_u2, never given in the paper) is chosen per preset so that the
# parameter count stays at the paper's 14M / 27M / 54M (RMT's own counts are 14.33M / 26.97M / 54.15M).
SDT_H_PRESETS: dict[str, dict[str, Any]] = {
    "SDT-H-T": dict(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), mlp_ratios=(3.0, 3.0, 3.0, 3.0),
        drop_path_rate=0.1, layer_scale_init_values=(None, None, None, None), fixed_decay_ranges=(4.0, 4.0, 6.0, 6.0),
        gate_rank=8, decay_modes=DEFAULT_DECAY_MODES,
    ),
    "SDT-H-S": dict(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16), mlp_ratios=(4.0, 4.0, 3.0, 3.0),
        drop_path_rate=0.15, layer_scale_init_values=(None, None, None, None), fixed_decay_ranges=(4.0, 4.0, 6.0, 6.0),
        gate_rank=16, decay_modes=DEFAULT_DECAY_MODES,
    ),
    "SDT-H-B": dict(
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16), mlp_ratios=(4.0, 4.0, 3.0, 3.0),
        drop_path_rate=0.4, layer_scale_init_values=(None, None, 1e-6, 1e-6), fixed_decay_ranges=(5.0, 5.0, 6.0, 6.0),
        gate_rank=4, decay_modes=DEFAULT_DECAY_MODES,
    ),
}
# RMT's released classification models (qhfan/RMT, ``classfication_release/RMT.py``: RMT_T3, RMT_S, RMT_M2), built by
# the same SDTH: widths, depths, heads, MLP ratios, drop path, layer scale and the gamma schedule (init 2, heads
# ranges) as RMT's; the fixed decay in every stage, decomposed (``chunkwise_recurrent=True``) in stages 1-2 of RMT-T
# and 1-3 of RMT-S / RMT-B; RoPE on the raster index; no output gate.  Their parameter counts equal RMT's code:
# 14,334,216 / 26,967,240 / 54,154,896.
RMT_PRESETS: dict[str, dict[str, Any]] = {
    "RMT-T": dict(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), mlp_ratios=(3.0, 3.0, 3.0, 3.0),
        drop_path_rate=0.1, layer_scale_init_values=(None, None, None, None), fixed_decay_ranges=(4.0, 4.0, 6.0, 6.0),
        gate_rank=0, decay_modes=("fixed_decomposed", "fixed_decomposed", "fixed", "fixed"), rope_layout="1d",
    ),
    "RMT-S": dict(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16), mlp_ratios=(4.0, 4.0, 3.0, 3.0),
        drop_path_rate=0.15, layer_scale_init_values=(None, None, None, None), fixed_decay_ranges=(4.0, 4.0, 6.0, 6.0),
        gate_rank=0, decay_modes=("fixed_decomposed",) * 3 + ("fixed",), rope_layout="1d",
    ),
    "RMT-B": dict(
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16), mlp_ratios=(4.0, 4.0, 3.0, 3.0),
        drop_path_rate=0.4, layer_scale_init_values=(None, None, 1e-6, 1e-6), fixed_decay_ranges=(5.0, 5.0, 6.0, 6.0),
        gate_rank=0, decay_modes=("fixed_decomposed",) * 3 + ("fixed",), rope_layout="1d",
    ),
}
SDT_H_PRESETS.update(RMT_PRESETS)  # one table for every caller (trainer --model, timm names, classifier)
# Per-stage sequence fields: one entry per stage.
STAGE_FIELDS = ("embed_dims", "depths", "num_heads", "mlp_ratios", "decay_modes", "layer_scale_init_values",
                "fixed_decay_ranges")


# timm's names of the presets (``timm.create_model("sdt_h_tiny")``), one table for every caller.
TIMM_NAMES: dict[str, str] = {"SDT-H-T": "sdt_h_tiny", "SDT-H-S": "sdt_h_small", "SDT-H-B": "sdt_h_base",
                              "RMT-T": "rmt_tiny", "RMT-S": "rmt_small", "RMT-B": "rmt_base"}
PRESET_OF_TIMM_NAME: dict[str, str] = {timm_name: preset for preset, timm_name in TIMM_NAMES.items()}


def sdt_h_preset(name: str) -> dict[str, Any]:
    """The keyword arguments of preset ``name`` (``"SDT-H-T"``, ``"SDT-H-S"``, ``"SDT-H-B"``, or RMT's
    ``"RMT-T"``, ``"RMT-S"``, ``"RMT-B"``)."""
    if name not in SDT_H_PRESETS:
        raise ValueError(f"unknown SDT-H preset {name!r}; choose one of {list(SDT_H_PRESETS)}")
    return dict(SDT_H_PRESETS[name])


# ------------------------------------------------------------------------------------------ init
def init_sdt_h_module(module: nn.Module, std: float = 0.02) -> None:
    """Initialise one module (not its children) as RMT does: Linear trunc-normal(std) with zero bias, norms at
    identity, convolutions with PyTorch's default; W_g = 0 so that G = log sigma(0) at init (as SDT-P); then each
    block's gates as its ``output_gate_init`` / ``decay_gate_init`` say (:meth:`SpatialDecayAttention.init_gates`).

    Applied children-first (``nn.Module.apply`` order), so the attention's W_g is zeroed after its Linear init and
    the block's gate choices come last.  Uses ``torch.nn.init`` looked up at call time, which transformers guards
    against re-initialising loaded weights; ``init_gates`` leaves tensors marked as loaded alone too.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):  # PyTorch's default (Conv2d.reset_parameters)
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if module.bias is not None:
            fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(module.bias, -bound, bound)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            nn.init.zeros_(module.running_mean)
            nn.init.ones_(module.running_var)
            nn.init.zeros_(module.num_batches_tracked)
    elif isinstance(module, SpatialDecayAttention):
        if module.gate is not None:
            nn.init.zeros_(module.gate.weight)
        if module.log_gamma is not None and not getattr(module.log_gamma, "_is_hf_initialized", False):
            with torch.no_grad():  # a non-persistent buffer: rebuilt after a meta-device construction
                module.log_gamma.copy_(module.fixed_log_gamma())
    elif isinstance(module, SDTHBlock):
        if module.gamma_1 is not None:
            nn.init.constant_(module.gamma_1, module.layer_scale_init_value)
            nn.init.constant_(module.gamma_2, module.layer_scale_init_value)
        # the defaults ("xavier", "zero") change nothing here and draw no random numbers
        module.attn.init_gates(module.output_gate_init, module.decay_gate_init)


# ------------------------------------------------------------------------------------------ layers
def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DWConv3x3(nn.Module):
    """Depthwise 3x3 convolution on channels-last maps (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SDTHFeedForward(nn.Module):
    """FFN of SDT-H (RMT's): ``fc1 -> GELU -> h + DWConv3x3(h) -> fc2`` on (B, H, W, C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = DWConv3x3(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h + self.dwconv(h))


class SDTHBlock(nn.Module):
    """CPE ``x + DWConv3x3(x)``, then ``x + DropPath(gamma_1 * SDA(LN(x)))`` and ``x + DropPath(gamma_2 * FFN(LN(x)))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, decay_mode: str, alpha: float, gate_rank: int,
        drop_path_rate: float, layer_scale_init_value: float | None, lpe_kernel_size: int, use_rope: bool,
        fixed_decay_init: float, fixed_decay_range: float, layer_norm_eps: float,
        output_gate_init: str = "xavier", decay_gate_init: str = "zero",
    ) -> None:
        """One block; ``gate_rank=0`` builds the attention without an output gate (RMT's).  ``output_gate_init`` /
        ``decay_gate_init``: how :func:`init_sdt_h_module` starts the attention's gates (see :class:`SDTH`)."""
        super().__init__()
        self.output_gate_init, self.decay_gate_init = output_gate_init, decay_gate_init
        self.cpe = DWConv3x3(dim)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = SpatialDecayAttention(
            dim, num_heads, decay_mode=decay_mode, alpha=alpha, gate_rank=gate_rank, lpe_kernel_size=lpe_kernel_size,
            use_rope=use_rope, fixed_decay_init=fixed_decay_init, fixed_decay_range=fixed_decay_range,
        )
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.ffn = SDTHFeedForward(dim, int(mlp_ratio * dim))
        self.drop_path_rate = drop_path_rate
        self.layer_scale_init_value = layer_scale_init_value
        if layer_scale_init_value:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: Tensor, context: GridContext) -> Tensor:
        """x: (B, H, W, C) channels-last; context: the stage's grid context (RoPE tables, backend, grid tensors)."""
        b, h, w, c = x.shape
        x = x + self.cpe(x)
        attn = self.attn(self.norm1(x).reshape(b, h * w, c), context)
        attn = attn.reshape(b, h, w, c)
        if self.gamma_1 is not None:
            attn = self.gamma_1 * attn
        x = x + drop_path(attn, self.drop_path_rate, self.training)
        ffn = self.ffn(self.norm2(x))
        if self.gamma_2 is not None:
            ffn = self.gamma_2 * ffn
        return x + drop_path(ffn, self.drop_path_rate, self.training)


class SDTHStage(nn.Module):
    """Optional downsampling (3x3 stride-2 conv + BatchNorm, NCHW) followed by SDT-H blocks."""

    def __init__(self, in_dim: int, dim: int, downsample: bool, blocks: list[SDTHBlock]) -> None:
        super().__init__()
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim)) if downsample else None
        )
        self.blocks = nn.ModuleList(blocks)


class SDTHHead(nn.Module):
    """``Linear -> BatchNorm -> Swish -> global average pool -> Linear`` (RMT's head); ``fc`` is Identity for 0 classes."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.norm = nn.BatchNorm2d(hidden)
        self.act = nn.SiLU()
        self.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def pre_logits(self, x: Tensor) -> Tensor:
        """NCHW features (B, C, H, W) -> pooled (B, hidden)."""
        x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(self.norm(x)).mean(dim=(2, 3))

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)


# ------------------------------------------------------------------------------------------ the model
def _as_tuple(name: str, value: Any, n: int | None = None) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence with one entry per stage, got {value!r}")
    value = tuple(value)
    if n is not None and len(value) != n:
        raise ValueError(f"{name} must have one entry per stage ({n} stages), got {len(value)}: {value!r}")
    return value


def check_sdt_h_args(**args: Any) -> dict[str, Any]:
    """Validate SDT-H's architecture arguments (a ValueError naming the bad one); per-stage fields become tuples.

    Called by :class:`SDTH` and by the transformers config, so that a bad config fails when it is made.
    """
    embed_dims = _as_tuple("embed_dims", args["embed_dims"])
    n = len(embed_dims)
    if n == 0:
        raise ValueError("embed_dims must name at least one stage")
    out = dict(args, embed_dims=embed_dims)
    for name in STAGE_FIELDS[1:]:
        if name in args:
            out[name] = _as_tuple(name, args[name], n)
    for i, mode in enumerate(out.get("decay_modes", ())):
        try:
            get_decay_mode(mode)
        except ValueError as err:
            raise ValueError(f"decay_modes[{i}]: {err}") from None
    use_rope = args.get("use_rope", True)
    layout = check_rope_layout(args.get("rope_layout", "2d"))
    multiple = ROPE_HEAD_MULTIPLE[layout]
    for i, (dim, heads, depth) in enumerate(zip(embed_dims, out["num_heads"], out["depths"])):
        if not isinstance(dim, int) or not isinstance(heads, int) or dim <= 0 or heads <= 0 or dim % heads:
            raise ValueError(f"embed_dims[{i}]={dim!r} must be a positive multiple of num_heads[{i}]={heads!r}")
        if use_rope and (dim // heads) % multiple:
            raise ValueError(f"{layout.upper()} RoPE needs a head width divisible by {multiple}; stage {i} has "
                             f"{dim}/{heads} = {dim // heads} (embed_dims[{i}] / num_heads[{i}])")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depths[{i}] must be an integer >= 0, got {depth!r}")
    if not 0.0 <= args.get("drop_path_rate", 0.0) < 1.0:
        raise ValueError(f"drop_path_rate must lie in [0, 1), got {args['drop_path_rate']}")
    gate_rank = args.get("gate_rank", 1)
    if not isinstance(gate_rank, int) or isinstance(gate_rank, bool) or gate_rank < 0:
        raise ValueError(f"gate_rank must be an integer >= 0 (0: no output gate, as RMT), got {gate_rank!r}")
    for name, choices in (("output_gate_init", OUTPUT_GATE_INITS), ("decay_gate_init", DECAY_GATE_INITS)):
        if args.get(name, choices[0]) not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {args[name]!r}")
    if args.get("decay_gate_init") == "rmt" and "cdsf" in out.get("decay_modes", ()) and args.get("alpha", 0.1) <= 0:
        raise ValueError(f"decay_gate_init='rmt' needs alpha > 0 (CDSF's decay is alpha * G * d), got {args['alpha']}")
    for name, low in (("num_labels", 0), ("num_channels", 1), ("head_hidden_size", 1)):
        if name in args and (not isinstance(args[name], int) or args[name] < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {args[name]!r}")
    check_backend_name(args.get("attention_backend", "auto"))
    return out


class SDTH(nn.Module):
    """SDT-H, the hierarchical Spatial Decay Transformer (default: the SDT-H-T preset, 1000 classes).

    Args:
        embed_dims: width of each stage.
        depths: blocks per stage.
        num_heads: attention heads per stage (head width ``embed_dims[i] / num_heads[i]``, a multiple of 4
            for 2D RoPE, of 2 for 1D RoPE).
        mlp_ratios: FFN hidden width / width, per stage.
        decay_modes: decay per stage: ``"decomposed"`` (eq. 11-12), ``"cdsf"`` (eq. 8-9), ``"none"``,
            ``"fixed"`` (RMT), ``"fixed_decomposed"`` (RMT's decomposed decay), ``"1d"`` or ``"bidirectional"``
            (eq. 6).
        alpha: CDSF scale (eq. 8), 0.1 as in the paper.
        drop_path_rate: stochastic depth of the last block; linear from 0 over all blocks.
        layer_scale_init_values: per stage, the initial layer-scale value, or None for no layer scale.
        gate_rank: rank r of the low-rank output gate ``U = sigma(X W_u1) W_u2``; 0: no output gate (RMT).
        head_hidden_size: width of the head's projection before pooling (1024 as in RMT).
        num_labels: classes of the classifier; 0 gives pooled features (``fc`` is Identity).
        num_channels: input channels.
        lpe_kernel_size: kernel of the depthwise LPE on V (5 as in RMT).
        use_rope: RoPE on Q and K.
        rope_base: RoPE frequency base.
        rope_layout: ``"2d"`` (axial 2D RoPE: half the rotary slots carry the row, half the column; SDT's) or
            ``"1d"`` (RMT's RoPE on the raster index ``h * W + w``); docs/sdt_h.md, "RoPE layout".
        fixed_decay_init, fixed_decay_ranges: RMT's gamma schedule for stages with ``decay_mode="fixed"``
            (one range per stage).
        layer_norm_eps: LayerNorm epsilon (1e-6 as in RMT).
        attention_backend: ``"auto"`` (per stage, the fastest exact backend for the device, decay and grid) or a
            name of ``sdt_diffusion.attention.available_backends()`` (docs/sdt_h.md, "Attention backends").
        initializer_range: std of the truncated-normal Linear init.
        output_gate_init: how the output gate U starts (the paper gives no initialisation; docs/sdt_h.md,
            "Initialisation"): ``"xavier"`` (default; W_u1, W_u2 truncated-normal like every Linear, so U starts as
            a small random-signed factor) or ``"unit"`` (U exactly 1 at start).
        decay_gate_init: how the decay gates W_g start: ``"zero"`` (default; W_g = 0 and bias 0, every head at
            ``G = log sigma(0)``) or ``"rmt"`` (W_g = 0, the bias spread per head so that each stage's decay per
            unit of distance starts at RMT's ``log gamma_h`` from ``fixed_decay_init`` and that stage's
            ``fixed_decay_ranges``).
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: Sequence[int] = (4, 4, 8, 16),
        mlp_ratios: Sequence[float] = (3.0, 3.0, 3.0, 3.0),
        decay_modes: Sequence[str] = DEFAULT_DECAY_MODES,
        alpha: float = 0.1,
        drop_path_rate: float = 0.1,
        layer_scale_init_values: Sequence[float | None] = (None, None, None, None),
        gate_rank: int = 8,
        head_hidden_size: int = 1024,
        num_labels: int = 1000,
        num_channels: int = 3,
        lpe_kernel_size: int = 5,
        use_rope: bool = True,
        rope_base: float = 10000.0,
        rope_layout: str = "2d",
        fixed_decay_init: float = 2.0,
        fixed_decay_ranges: Sequence[float] = (4.0, 4.0, 6.0, 6.0),
        layer_norm_eps: float = 1e-6,
        attention_backend: str = "auto",
        initializer_range: float = 0.02,
        output_gate_init: str = "xavier",
        decay_gate_init: str = "zero",
    ) -> None:
        super().__init__()
        args = check_sdt_h_args(
            embed_dims=embed_dims, depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios, decay_modes=decay_modes,
            layer_scale_init_values=layer_scale_init_values, fixed_decay_ranges=fixed_decay_ranges,
            drop_path_rate=drop_path_rate, gate_rank=gate_rank, use_rope=use_rope, rope_layout=rope_layout,
            num_labels=num_labels, num_channels=num_channels, head_hidden_size=head_hidden_size,
            attention_backend=attention_backend, alpha=alpha, output_gate_init=output_gate_init,
            decay_gate_init=decay_gate_init,
        )
        embed_dims, depths, num_heads, mlp_ratios = (args[k] for k in ("embed_dims", "depths", "num_heads", "mlp_ratios"))
        decay_modes, layer_scale_init_values = args["decay_modes"], args["layer_scale_init_values"]
        fixed_decay_ranges = args["fixed_decay_ranges"]
        n = len(embed_dims)

        self.embed_dims, self.depths, self.num_heads = embed_dims, depths, num_heads
        self.decay_modes = decay_modes
        self.use_rope, self.rope_base, self.rope_layout = use_rope, rope_base, rope_layout
        self.attention_backend = attention_backend
        self.num_channels = num_channels
        self.num_classes = num_labels
        self.num_features = embed_dims[-1]
        self.head_hidden_size = head_hidden_size
        self.gradient_checkpointing = False
        self.initializer_range = initializer_range
        self.output_gate_init, self.decay_gate_init = output_gate_init, decay_gate_init

        c0 = embed_dims[0]
        self.stem = nn.Sequential(
            nn.Conv2d(num_channels, c0 // 2, 3, stride=2, padding=1), nn.BatchNorm2d(c0 // 2), nn.GELU(),
            nn.Conv2d(c0 // 2, c0 // 2, 3, stride=1, padding=1), nn.BatchNorm2d(c0 // 2), nn.GELU(),
            nn.Conv2d(c0 // 2, c0, 3, stride=2, padding=1), nn.BatchNorm2d(c0), nn.GELU(),
            nn.Conv2d(c0, c0, 3, stride=1, padding=1), nn.BatchNorm2d(c0),
        )
        total = sum(depths)
        rates = [drop_path_rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]  # linear in depth
        self.stages = nn.ModuleList()
        self.feature_info: list[dict[str, Any]] = []
        first = 0
        for i in range(n):
            blocks = [
                SDTHBlock(
                    embed_dims[i], num_heads[i], mlp_ratios[i], decay_modes[i], alpha, gate_rank, rates[first + j],
                    layer_scale_init_values[i], lpe_kernel_size, use_rope, fixed_decay_init, fixed_decay_ranges[i],
                    layer_norm_eps, output_gate_init, decay_gate_init,
                )
                for j in range(depths[i])
            ]
            first += depths[i]
            self.stages.append(SDTHStage(embed_dims[i - 1] if i else c0, embed_dims[i], i > 0, blocks))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.head: SDTHHead | None = SDTHHead(embed_dims[-1], head_hidden_size, num_labels)
        self.apply(lambda m: init_sdt_h_module(m, initializer_range))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SDTH:
        """Build a preset (``SDT-H-T/S/B`` or RMT's ``RMT-T/S/B``); keyword arguments override the preset's."""
        return cls(**{**sdt_h_preset(name), **overrides})

    # ---------------------------------------------------------------------------------- helpers
    @property
    def reduction(self) -> int:
        """Total stride of the stages present (32 for four stages): input sides must be multiples of it."""
        return self.feature_info[len(self.stages) - 1]["reduction"]

    def set_attention_backend(self, backend: str) -> None:
        """Run every stage's attention with ``backend`` (``"auto"`` picks per stage and device)."""
        check_backend_name(backend, "backend")
        self.attention_backend = backend

    def check_pixel_values(self, x: Tensor) -> None:
        """A ValueError naming the problem unless ``x`` is (B, num_channels, H, W) with H, W multiples of the stride."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"pixel values must be a (B, C, H, W) tensor, got {shape}")
        _, c, h, w = x.shape
        if c != self.num_channels:
            raise ValueError(f"input has {c} channels but the model expects num_channels={self.num_channels}")
        r = self.reduction
        if h % r or w % r or h == 0 or w == 0:
            raise ValueError(f"input size {h}x{w} is not divisible by {r} (the total stride of SDT-H's stages); "
                             f"resize or pad the image to a multiple of {r}")
        if not x.is_floating_point():
            raise ValueError(f"pixel values must be floating point, got {x.dtype}")

    def _stage_context(self, i: int, height: int, width: int, x: Tensor) -> GridContext:
        """What every block of stage ``i`` shares on an ``height`` x ``width`` map of ``x`` (RoPE tables, the
        attention backend and what it reads of the grid), built once per stage and forward."""
        return GridContext.build(
            height, width, head_dim=self.embed_dims[i] // self.num_heads[i], decay_mode=self.decay_modes[i],
            backend=self.attention_backend, device=x.device, dtype=x.dtype, use_rope=self.use_rope,
            rope_base=self.rope_base, rope_layout=self.rope_layout,
        )

    def _run_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i`` on NCHW ``x``: downsample (NCHW), blocks (NHWC); returns NCHW."""
        stage = self.stages[i]
        if stage.downsample is not None:
            x = stage.downsample(x)
        _, _, h, w = x.shape
        context = self._stage_context(i, h, w, x)
        x = x.permute(0, 2, 3, 1)
        for block in stage.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, context, use_reentrant=False)
            else:
                x = block(x, context)
        return x.permute(0, 3, 1, 2)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The stem's output and every stage's output, NCHW (strides 4, 4, 8, 16, 32 for four stages)."""
        self.check_pixel_values(x)
        outputs = [self.stem(x)]
        for i in range(len(self.stages)):
            outputs.append(self._run_stage(i, outputs[-1]))
        return outputs

    # ---------------------------------------------------------------------------------- timm's model API
    def forward_features(self, x: Tensor) -> Tensor:
        """Pixels (B, C, H, W) -> last stage's map (B, C4, H/32, W/32), NCHW."""
        self.check_pixel_values(x)
        x = self.stem(x)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Head on ``forward_features`` output: logits, or the pooled ``head_hidden_size`` vector with ``pre_logits``."""
        if self.head is None:
            raise ValueError("this model's head was pruned (features only); it has no forward_head")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_labels), or pooled features (B, head_hidden_size) when ``num_labels == 0``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final Linear (Identity when there are no classes)."""
        if self.head is None:
            raise ValueError("this model's head was pruned (features only); it has no classifier")
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the final Linear by a fresh one with ``num_classes`` outputs (0: Identity)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be 'avg' (SDT-H's head normalises before pooling), got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if self.head is None:
            raise ValueError("this model's head was pruned (features only); it has no classifier to reset")
        self.num_classes = num_classes
        device = self.head.proj.weight.device
        dtype = self.head.proj.weight.dtype
        fc = nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype) if num_classes else nn.Identity()
        fc.apply(lambda m: init_sdt_h_module(m, self.initializer_range))
        self.head.fc = fc

    def take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """timm's convention: None -> all stages, int n -> last n, sequence -> those (negative from the end).

        A ValueError names an index out of range (timm's own helper asserts).
        """
        n = len(self.stages)
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"out_indices: last-n value {indices} is out of range (1 to {n})")
            return list(range(n - indices, n))
        taken = []
        for idx in indices:
            if not isinstance(idx, int) or not -n <= idx < n:
                raise ValueError(f"out_indices: stage index {idx!r} is out of range (0 to {n - 1}, or -{n} to -1)")
            taken.append(idx % n)
        if not taken:
            raise ValueError("out_indices must name at least one stage")
        if len(set(taken)) != len(taken):
            raise ValueError(f"out_indices must not repeat a stage, got {list(indices)}")
        return sorted(taken)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (NCHW, strides 4 / 8 / 16 / 32) for ``indices``, and optionally the final features.

        Args:
            indices: stages to return (timm's convention, see :meth:`take_indices`).
            norm: unsupported (SDT-H has no final norm); must be False.
            stop_early: stop after the last requested stage.
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return only the list of maps.
        """
        take = self.take_indices(indices)
        if norm:
            raise ValueError("norm=True: SDT-H has no final norm to apply to intermediates")
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self.check_pixel_values(x)
        last = take[-1] if (stop_early or intermediates_only) else len(self.stages) - 1
        intermediates = []
        x = self.stem(x)
        for i in range(last + 1):
            x = self._run_stage(i, x)
            if i in take:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] | None = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` and (with ``prune_head``) the head; returns the kept indices."""
        take = self.take_indices(indices)
        self.stages = self.stages[: take[-1] + 1]
        if prune_head or take[-1] < len(self.feature_info) - 1:
            self.head = None
            self.num_classes = 0
        self.num_features = self.embed_dims[take[-1]]
        return take

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (saves activation memory)."""
        self.gradient_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Layer-scale parameters (RMT's optimiser also excludes every 1-D parameter and bias, as timm's does)."""
        return {name for name, _ in self.named_parameters() if re.search(r"\.gamma_[12]$", name)}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: the stem, then each stage (coarse) or each block (a stage's
        downsampling joins its first block); the head, unmatched, forms the last group (timm's convention)."""
        if coarse:
            return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])


def sdt_h_extra_parameters(embed_dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                           decay_modes: Sequence[str], gate_rank: int) -> int:
    """Parameters SDT-H adds to RMT's architecture: W_g (with bias; two per head for ``decomposed``, none for
    ``none``/``fixed``/``fixed_decomposed``) and the low-rank output gate W_u1, W_u2 (2 D r, no bias; none for
    ``gate_rank=0``)."""
    total = 0
    for dim, depth, heads, mode in zip(embed_dims, depths, num_heads, decay_modes):
        outputs = get_decay_mode(mode).gate_outputs * heads
        total += depth * (dim * outputs + outputs + 2 * dim * gate_rank)
    return total


__all__ = [
    "DEFAULT_DECAY_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SDTH",
    "PRESET_OF_TIMM_NAME",
    "RMT_PRESETS",
    "SDT_H_PRESETS",
    "TIMM_NAMES",
    "init_sdt_h_module",
    "sdt_h_extra_parameters",
    "sdt_h_preset",
]
