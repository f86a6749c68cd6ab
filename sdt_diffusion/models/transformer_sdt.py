"""SDTTransformer2DModel: DiT's plain transformer with Spatial Decay Attention (SDT-P)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ..attention.backends import check_backend_name
from ..attention.grid import GridContext
from ..attention.modes import decay_mode as get_decay_mode
from ..utils.validation import check_bool, check_finite, check_int
from .spatial_decay_attention import DECAY_GATE_INITS, OUTPUT_GATE_INITS, SpatialDecayAttention
from .utils import dit_base_init

# name -> (num_layers, hidden width, heads); DiT's sizes (DiT paper, Table 1).
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def size_presets(family: str) -> dict[str, dict[str, int]]:
    """``{family}-{S,B,L,XL}/{2,4,8}`` -> layers, heads, head width and patch size of DiT's sizes."""
    return {
        f"{family}-{size}/{patch}": {
            "num_layers": depth,
            "num_attention_heads": heads,
            "attention_head_dim": width // heads,
            "patch_size": patch,
        }
        for size, (depth, width, heads) in MODEL_SIZES.items()
        for patch in (2, 4, 8)
    }


PRESETS: dict[str, dict[str, int]] = size_presets("SDT-P")


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepClassEmbedding(nn.Module):
    """DiT's conditioning c = t_emb + y_emb, with label dropout to the null label for guidance."""

    def __init__(self, num_classes: int, dim: int, class_dropout_prob: float, freq_shift: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        # DiT's frequency embedding: [cos, sin] of t * 10000^(-k / (128 - freq_shift)), k < 128; DiT's code has
        # freq_shift 0, diffusers' DiT port (CombinedTimestepLabelEmbeddings) 1.
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=freq_shift)
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.class_embedder = nn.Embedding(num_classes + 1, dim)  # row num_classes = null label

    def forward(self, timestep: Tensor, labels: Tensor, dtype: torch.dtype, force_drop_ids: Tensor | None) -> Tensor:
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.to(labels.device).bool(), self.num_classes, labels)
        elif self.training and self.class_dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.class_dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        t_emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        return t_emb + self.class_embedder(labels).to(dtype)


class SDTBlock(nn.Module):
    """DiT block with adaLN-Zero modulation; attention is Spatial Decay Attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 **attn_kwargs: Any) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SpatialDecayAttention(dim, num_heads, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, context: GridContext) -> Tensor:
        """x: tokens (B, L, D); c: conditioning (B, D); context: the forward's grid context (RoPE, backend, grid)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        attn = self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), context)
        x = x + gate_msa[:, None] * attn
        return x + gate_mlp[:, None] * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class SDTFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and the linear map back to patches."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


# Models beyond this many parameters are refused before any memory is allocated (a typo such as
# ``num_layers: 1000000`` must not try to build itself); the largest preset, SDT-P-XL/2, has 0.68B.
MAX_PARAMETERS = 20_000_000_000


def approximate_parameters(num_layers: int, dim: int, mlp_ratio: float, patch_dim: int) -> int:
    """A close upper estimate of the parameter count: per block, qkv + output projection + adaLN (10 D^2)
    and the MLP (2 ratio D^2), plus the patch embedding and the final layer."""
    return int(num_layers * (10 + 2 * mlp_ratio) * dim * dim + 4 * patch_dim * dim + 2 * dim * dim)


def _validate_config(**cfg) -> None:
    """Refuse config values that are of the wrong type, out of range, or absurdly large (named in the error)."""
    for name in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size",
                 "patch_size", "num_embeds_ada_norm", "gate_rank", "lpe_kernel_size"):
        check_int(name, cfg[name], minimum=1)
    check_int("freq_shift", cfg["freq_shift"], minimum=0, maximum=1)
    if cfg["lpe_kernel_size"] % 2 == 0:
        raise ValueError(f"lpe_kernel_size must be odd (a centred depthwise kernel), got {cfg['lpe_kernel_size']}")
    for name in ("learn_sigma", "use_rope", "use_abs_pos_embed", "use_lpe", "use_output_gate"):
        check_bool(name, cfg[name])
    check_finite("class_dropout_prob", cfg["class_dropout_prob"], minimum=0.0, maximum=1.0)
    check_finite("mlp_ratio", cfg["mlp_ratio"], minimum=0.0, strict_minimum=True)
    check_finite("norm_eps", cfg["norm_eps"], minimum=0.0, maximum=1.0, strict_minimum=True)
    # the decay must stay a decay: the fused backends assume alpha >= 0 (eq. 8-9 hold for any alpha, but a
    # negative one turns the decay into a growth with distance)
    check_finite("alpha", cfg["alpha"], minimum=0.0)
    check_finite("rope_base", cfg["rope_base"], minimum=1.0, strict_minimum=True)
    check_finite("fixed_decay_init", cfg["fixed_decay_init"], minimum=0.0, strict_minimum=True)
    check_finite("fixed_decay_range", cfg["fixed_decay_range"], minimum=0.0, strict_minimum=True)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    size = approximate_parameters(cfg["num_layers"], dim, cfg["mlp_ratio"],
                                  cfg["patch_size"] ** 2 * cfg["in_channels"])
    if size > MAX_PARAMETERS:
        raise ValueError(
            f"this config would build about {size / 1e9:.0f}B parameters (num_layers={cfg['num_layers']}, width "
            f"{dim}), more than the {MAX_PARAMETERS / 1e9:.0f}B this library builds; check the sizes"
        )


class SDTTransformer2DModel(ModelMixin, ConfigMixin):
    """Spatial Decay Transformer, plain variant (SDT-P), as a class-conditional diffusion backbone.

    A drop-in for diffusers' ``DiTTransformer2DModel``: same config names where the concept is the
    same and the same ``forward(hidden_states, timestep, class_labels)``.  Every block's attention is
    Spatial Decay Attention: context-aware gates, a decay bias (``decay_mode``), 2D RoPE, LPE on V and
    a low-rank output gate, each a config switch.  With ``decay_mode="none"``, ``use_rope``, ``use_lpe`` and
    ``use_output_gate`` off and ``use_abs_pos_embed`` on, the model is the original DiT (``convert_dit`` loads
    its weights).

    Args:
        num_attention_heads: heads per block (N).
        attention_head_dim: width of one head (d); hidden width = N * d.
        in_channels: input channels (4 for SD-VAE latents).
        out_channels: output channels; ``None`` means ``2 * in_channels`` with ``learn_sigma`` else
            ``in_channels``.
        num_layers: number of blocks.
        sample_size: the spatial size the model is built for (latent pixels).  With ``use_abs_pos_embed`` (the
            default) it fixes the token grid, as in DiT; with it off, other sizes divisible by ``patch_size``
            also work (RoPE, LPE and the decay are resolution-free).
        patch_size: patch size p.
        num_embeds_ada_norm: number of classes; the null (unconditional) label is this number.
        class_dropout_prob: probability of replacing a label by the null label in training.
        learn_sigma: predict the variance as well (DiT's learned-range output), default True.
        mlp_ratio: MLP hidden width / hidden width.
        decay_mode: ``"cdsf"`` (paper), ``"none"``, ``"fixed"`` (RMT), ``"1d"``, ``"bidirectional"``,
            ``"decomposed"``.
        alpha: CDSF scale (eq. 8), 0.1 as in the paper.
        attention_backend: ``"auto"`` (the fastest exact backend for the device, decay and grid) or a name of
            ``sdt_diffusion.attention.available_backends()`` (docs/model.md, "Attention backends").
        gate_rank: rank r of the low-rank output gate ``U = sigma(X W_u1) W_u2``.
        lpe_kernel_size: kernel of the depthwise LPE convolution (5 as in RMT).
        use_rope: apply 2D axial RoPE to Q and K.
        rope_base: RoPE frequency base.
        use_abs_pos_embed: add DiT's fixed 2D sin-cos position embedding (positions 0..grid-1) to the patch
            tokens, as DiT does; the model then runs on the ``sample_size`` grid only (the table is not
            interpolated).  On by default: the paper replaces DiT's attention and says nothing about DiT's position
            embedding, and SDT-P without it followed class labels far later at equal steps (guided class
            consistency 0.29 against 0.64 with it, 3 seeds; benchmarks/RESULTS.md, "SDT-P against DiT, part by
            part").  ``False`` gives the resolution-free model of earlier releases.
        fixed_decay_init, fixed_decay_range: RMT's gamma schedule for ``decay_mode="fixed"``.
        use_lpe: add the depthwise LPE convolution of V to the attention output (eq. 13).
        use_output_gate: multiply the attention output by the low-rank gate U (eq. 13).
        freq_shift: timestep frequencies ``10000^(-k / (128 - freq_shift))``: 0 as in DiT's code, 1 as in
            diffusers' DiT port (``downscale_freq_shift=1``).
        norm_eps: epsilon of each block's LayerNorm before the MLP: 1e-6 as in DiT's code; diffusers' DiT port
            uses its ``norm_eps`` (1e-5 by default) there.
        output_gate_init: ``"xavier"`` (DiT's linear init: U starts as a small random-signed factor) or
            ``"unit"`` (U starts exactly 1).  The paper gives no initialisation (docs/model.md).
        decay_gate_init: ``"zero"`` (W_g = 0 and bias 0: every head starts at G = log sigma(0)) or ``"rmt"``
            (W_g = 0, the bias spread per head so the decay starts at RMT's gamma schedule).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SDTBlock"]
    # Modules that `enable_layerwise_casting()` keeps in the compute dtype: regexes searched in module names, added
    # to diffusers' defaults ("pos_embed", "patch_embed", "norm", ...), which match nothing with weights here (the
    # norms have no affine weights, the sin-cos position embedding is a buffer).  Rounding in these modules
    # reaches every token of every layer; they hold about a third of the weights (mostly adaLN):
    # - x_embedder: the patch embedding, the one map from the latents into the network;
    # - emb: the timestep MLP and the class table, i.e. the conditioning c of every adaLN modulation;
    # - adaLN_modulation: each block's shift/scale/gate (diffusers' DiT keeps these, which live in its
    #   AdaLayerNormZero "norm1", out of the cast through its "norm" pattern);
    # - final_layer: the output projection, which writes epsilon and the variance interpolation directly;
    # - attn.gate (W_g): the decay gate; the decay bias multiplies a gate by the token distance (eq. 8) or sums
    #   gates along the path (eq. 6), so a rounding error in W_g grows with distance.
    # What is cast: attention qkv/proj, the LPE convolution, the low-rank output gate and the MLP.
    _skip_layerwise_casting_patterns = [
        "x_embedder", r"^emb\.", "adaLN_modulation", r"^final_layer\.", r"\.attn\.gate$",
    ]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        sample_size: int = 32,
        patch_size: int = 2,
        num_embeds_ada_norm: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        mlp_ratio: float = 4.0,
        decay_mode: str = "cdsf",
        alpha: float = 0.1,
        attention_backend: str = "auto",
        gate_rank: int = 16,
        lpe_kernel_size: int = 5,
        use_rope: bool = True,
        rope_base: float = 10000.0,
        use_abs_pos_embed: bool = True,
        fixed_decay_init: float = 2.0,
        fixed_decay_range: float = 4.0,
        use_lpe: bool = True,
        use_output_gate: bool = True,
        freq_shift: int = 0,
        norm_eps: float = 1e-6,
        output_gate_init: str = "xavier",
        decay_gate_init: str = "zero",
    ) -> None:
        super().__init__()
        for name, value, choices in (("output_gate_init", output_gate_init, OUTPUT_GATE_INITS),
                                     ("decay_gate_init", decay_gate_init, DECAY_GATE_INITS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        _validate_config(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            num_layers=num_layers, sample_size=sample_size, patch_size=patch_size,
            num_embeds_ada_norm=num_embeds_ada_norm, class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma,
            mlp_ratio=mlp_ratio, alpha=alpha, gate_rank=gate_rank, lpe_kernel_size=lpe_kernel_size,
            use_rope=use_rope, rope_base=rope_base, use_abs_pos_embed=use_abs_pos_embed,
            fixed_decay_init=fixed_decay_init, fixed_decay_range=fixed_decay_range, use_lpe=use_lpe,
            use_output_gate=use_output_gate, freq_shift=freq_shift, norm_eps=norm_eps,
        )
        get_decay_mode(decay_mode)  # a ValueError naming the choices for an unknown mode
        check_backend_name(attention_backend)
        if use_rope and attention_head_dim % 4:
            raise ValueError(f"2D RoPE needs attention_head_dim divisible by 4, got {attention_head_dim}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        expected_out = in_channels * (2 if learn_sigma else 1)
        if out_channels is not None and out_channels != expected_out:
            raise ValueError(
                f"out_channels={out_channels} contradicts learn_sigma={learn_sigma} with in_channels={in_channels} "
                f"(expected {expected_out})"
            )
        self.out_channels = expected_out
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.gradient_checkpointing = False

        self.x_embedder = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.emb = TimestepClassEmbedding(num_embeds_ada_norm, dim, class_dropout_prob, freq_shift)
        if use_abs_pos_embed:
            # DiT's grid: positions 0..grid-1 on both axes (diffusers' default base_size=16 would scale them)
            grid = sample_size // patch_size
            pos = get_2d_sincos_pos_embed(dim, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
            self.register_buffer("pos_embed", pos.float()[None], persistent=False)
        self.blocks = nn.ModuleList(
            SDTBlock(
                dim, num_attention_heads, mlp_ratio, norm_eps, decay_mode=decay_mode, alpha=alpha, gate_rank=gate_rank,
                lpe_kernel_size=lpe_kernel_size, use_rope=use_rope, fixed_decay_init=fixed_decay_init,
                fixed_decay_range=fixed_decay_range, use_lpe=use_lpe, use_output_gate=use_output_gate,
            )
            for _ in range(num_layers)
        )
        self.final_layer = SDTFinalLayer(dim, patch_size, self.out_channels)
        self._init_weights()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SDTTransformer2DModel:
        """Build ``SDT-P-{S,B,L,XL}/{2,4,8}`` (DiT's sizes for 256x256 images / 32x32 latents)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def set_attention_backend(self, backend: str) -> None:
        """Switch the spatial-decay attention backend (``"auto"`` or a name of ``attention.available_backends()``);
        the choice is stored in the config, so it is saved with the model.

        Overrides diffusers' ``ModelMixin.set_attention_backend``, whose backend names (``"native"``,
        ``"flash"``, ...) address diffusers' own attention processors, which this model does not use.
        """
        check_backend_name(backend, "backend")
        self.register_to_config(attention_backend=backend)

    def reset_attention_backend(self) -> None:
        """Back to ``attention_backend="auto"``."""
        self.set_attention_backend("auto")

    def _init_weights(self) -> None:
        """DiT's initialisation: xavier linears, zero-initialised adaLN modulation and final layer."""
        dit_base_init(self, self.x_embedder)
        nn.init.normal_(self.emb.class_embedder.weight, std=0.02)
        nn.init.normal_(self.emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.emb.timestep_embedder.linear_2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            # W_g = 0, bias 0 (G = log sigma(0) for every head) or RMT's per-head gamma; U as chosen
            block.attn.init_gates(self.config.output_gate_init, self.config.decay_gate_init)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def num_classes(self) -> int:
        """Number of classes; the null label used for guidance equals this number."""
        return self.config.num_embeds_ada_norm

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, hidden_states: Tensor, timestep: Tensor, class_labels: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        if hidden_states.dim() != 4:
            raise ValueError(f"hidden_states must be (B, C, H, W), got shape {tuple(hidden_states.shape)}")
        b, c, h, w = hidden_states.shape
        if c != cfg.in_channels:
            raise ValueError(f"hidden_states has {c} channels but the model expects in_channels={cfg.in_channels}")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"spatial size {h}x{w} is not divisible by patch_size={cfg.patch_size}; the RoPE/LPE/decay token "
                f"grid needs whole patches"
            )
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(b)
        if timestep.shape != (b,):
            raise ValueError(f"timestep must be a scalar or have shape ({b},), got {tuple(timestep.shape)}")
        if not torch.compiler.is_compiling() and timestep.is_floating_point() and not torch.isfinite(timestep).all():
            raise ValueError(f"timestep must be finite, got {timestep.tolist()}")
        if class_labels is None:
            raise ValueError("class_labels are required (use the null label num_classes for unconditional)")
        class_labels = torch.as_tensor(class_labels, device=hidden_states.device)
        if class_labels.dim() == 0:
            class_labels = class_labels.expand(b)
        if class_labels.shape != (b,):
            raise ValueError(f"class_labels must have shape ({b},), got {tuple(class_labels.shape)}")
        if class_labels.is_floating_point():
            raise ValueError("class_labels must be integers")
        if not torch.compiler.is_compiling() and class_labels.numel():
            lo, hi = int(class_labels.min()), int(class_labels.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(
                    f"class_labels must lie in [0, {self.num_classes}] ({self.num_classes} = null label), "
                    f"got values in [{lo}, {hi}]"
                )
        return timestep, class_labels

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | int | float,
        class_labels: Tensor,
        return_dict: bool = True,
        force_drop_ids: Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Predict noise (and variance) for latents ``hidden_states`` (B, C, H, W).

        Args:
            hidden_states: noisy latents.
            timestep: diffusion step, scalar or (B,).
            class_labels: (B,) integer labels in ``[0, num_classes]``; ``num_classes`` is the null label.
            return_dict: return a ``Transformer2DModelOutput`` (else a tuple).
            force_drop_ids: optional (B,) mask; 1 replaces the label by the null label.
        """
        timestep, class_labels = self._check_inputs(hidden_states, timestep, class_labels)
        p = self.config.patch_size
        b, _, h, w = hidden_states.shape
        gh, gw = h // p, w // p

        # (B, L, D), made contiguous once: a transposed residual stream would make every LayerNorm and every
        # linear layer of every block copy its input, forward and backward
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2).contiguous()
        if self.config.use_abs_pos_embed:
            if (gh, gw) != (self.config.sample_size // p,) * 2:
                raise ValueError(
                    f"use_abs_pos_embed=True fixes the grid to {self.config.sample_size // p}^2 tokens, got {gh}x{gw}"
                )
            x = x + self.pos_embed.to(x.dtype)
        c = self.emb(timestep, class_labels, x.dtype, force_drop_ids)
        # Built once here, shared by every block: RoPE tables, the backend and what it reads of the grid.
        context = GridContext.build(
            gh, gw, head_dim=self.config.attention_head_dim, decay_mode=self.config.decay_mode,
            backend=self.config.attention_backend, device=x.device, dtype=x.dtype, use_rope=self.config.use_rope,
            rope_base=self.config.rope_base,
        )
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, context)
            else:
                x = block(x, c, context)

        x = self.final_layer(x, c)  # (B, L, p*p*C_out)
        x = x.reshape(b, gh, gw, p, p, self.out_channels)
        out = torch.einsum("bhwpqc->bchpwq", x).reshape(b, self.out_channels, h, w)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


__all__ = ["SDTTransformer2DModel", "PRESETS", "MODEL_SIZES"]
