"""DiT weights in, SDT-P out: :func:`convert_dit` and the ``sdt-convert-dit`` command.

The paper builds SDT-P by replacing DiT's attention with Spatial Decay Attention.  With every SDA part switched
off (``decay_mode="none"``, no RoPE, no LPE, no output gate) and DiT's absolute sin-cos position embedding on,
:class:`~sdt_diffusion.models.transformer_sdt.SDTTransformer2DModel` is DiT itself, so DiT's weights load into
it exactly.  Two sources are read:

* diffusers' ``DiTTransformer2DModel`` (in memory, a model folder, or a pipeline folder with ``transformer/``
  such as ``facebook/DiT-XL-2-256``).  Its port keeps one timestep/class embedder per block (the original
  shares one); they must hold the same weights, or ``take_block0_embedder=True`` takes block 0's.  Its
  timestep frequencies use ``downscale_freq_shift=1`` and its pre-MLP LayerNorm its ``norm_eps``: the
  converted config keeps both (``freq_shift``, ``norm_eps``), so the output is the same function.
* the original DiT checkpoint (``DiT-XL-2-256x256.pt``, a plain state dict of DiT's ``models.py``), read with
  ``torch.load(weights_only=True)``.

SDA parts switched on are initialised inert, so fine-tuning starts from DiT's function: LPE zero, the output
gate exactly 1 (``W_u1 = 0``, each row of ``W_u2`` summing to 2, so ``U = sigma(0) * 2 = 1``), and the decay
gates at ``G = logsigmoid(INERT_GATE_LOGIT)``, a decay of about 1e-7 per unit of distance.  RoPE has no inert
setting: switching it on changes the function (a warning says so).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from torch import Tensor

from ..attention.modes import decay_mode as decay_mode_spec
from ..utils.cli_args import add_dtype_argument, torch_dtype
from ..utils.errors import ConfigError
from ..utils.validation import check_int
from .transformer_sdt import MODEL_SIZES, SDTTransformer2DModel

__all__ = ["INERT_GATE_LOGIT", "CONVERTIBLE_DECAY_MODES", "convert_dit", "diffusers_to_dit_state_dict", "main"]

# Gate logit of the inert decay: G = logsigmoid(16) = -1.1e-7, so the CDSF bias is at most
# alpha * 1.1e-7 * d(i, j) (3.4e-7 across a 16x16 grid at alpha = 0.1).  Its gradient is as small, but Adam
# normalises step sizes, so the gate still moves by about the learning rate per step.
INERT_GATE_LOGIT = 16.0
# Decay modes that start inert from DiT's weights: their gates scale the decay to ~0.  "fixed" (RMT's constant
# gamma) has no gate, and "decomposed" attends along rows then columns, which is not DiT's full attention.
CONVERTIBLE_DECAY_MODES = ("none", "cdsf", "1d", "bidirectional")

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


# ------------------------------------------------------------------------------------------ reading
def _load_original(path: Path) -> dict[str, Tensor]:
    """A DiT checkpoint file (``DiT-XL-2-256x256.pt``): a plain state dict, or one under ``"ema"``/``"model"``
    (DiT's training checkpoints), read with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code, truncated files, ...
        raise ConfigError(f"cannot read DiT checkpoint {str(path)!r} with torch.load(weights_only=True): {e}") from e
    if isinstance(state, Mapping) and "x_embedder.proj.weight" not in state:
        for key in ("ema", "model"):  # DiT's train.py saves {"model", "ema", "opt", "args"}; sampling uses ema
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or "x_embedder.proj.weight" not in state:
        raise ConfigError(f"{str(path)!r} is not a DiT state dict (no 'x_embedder.proj.weight' key)")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _load_diffusers(path: Path) -> tuple[DiTTransformer2DModel, Path | None]:
    """A diffusers DiT from a model folder or a pipeline folder (``transformer/``); the pipeline root or None."""
    if (path / "transformer" / "config.json").is_file():
        return DiTTransformer2DModel.from_pretrained(path, subfolder="transformer"), path
    if (path / "config.json").is_file():
        name = json.loads((path / "config.json").read_text()).get("_class_name")
        if name not in ("DiTTransformer2DModel", "Transformer2DModel"):
            raise ConfigError(f"{str(path)!r} holds a {name}, not a diffusers DiTTransformer2DModel")
        return DiTTransformer2DModel.from_pretrained(path), None
    raise ConfigError(f"{str(path)!r} is neither a DiT checkpoint file nor a diffusers DiT folder (config.json or "
                      f"transformer/config.json)")


def _check_diffusers_dit(model: DiTTransformer2DModel) -> None:
    """Refuse diffusers DiT configs that SDT-P cannot represent."""
    cfg = model.config
    # DiT's block: adaLN-Zero, tanh-approximated GELU (diffusers' "gelu-approximate"), q/k/v with biases
    wanted = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False}
    for name, value in wanted.items():
        if cfg.get(name, value) != value:
            raise ConfigError(f"the diffusers DiT has {name}={cfg.get(name)!r}; SDT-P represents {name}={value!r} only")


def _shared_embedder(model: DiTTransformer2DModel, take_block0: bool) -> None:
    """Refuse a diffusers DiT whose per-block embedders differ, unless block 0's is to be taken."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for i, block in enumerate(model.transformer_blocks[1:], start=1):
        for name, value in block.norm1.emb.state_dict().items():
            if not torch.equal(value, first[name]):
                if take_block0:
                    warnings.warn(f"the diffusers DiT's per-block embedders differ (block {i}, {name}); taking "
                                  f"block 0's: the converted model is not the same function", stacklevel=3)
                    return
                raise ConfigError(
                    f"the diffusers DiT's per-block timestep/class embedders differ (block {i}, {name}): SDT-P has "
                    f"one embedder shared by every block (as DiT's code), so this model cannot be represented "
                    f"exactly; pass take_block0_embedder=True (--take-block0-embedder) to take block 0's")


def diffusers_to_dit_state_dict(model: DiTTransformer2DModel) -> dict[str, Tensor]:
    """diffusers' DiT weights under the original DiT's key names (block 0's embedder; q, k, v stacked)."""
    sd = model.state_dict()
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
        "y_embedder.embedding_table.weight": sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"],
    }
    for i, layer in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            out[f"t_embedder.mlp.{i}.{p}"] = sd[f"transformer_blocks.0.norm1.emb.timestep_embedder.{layer}.{p}"]
    for n in range(len(model.transformer_blocks)):
        src, dst = f"transformer_blocks.{n}.", f"blocks.{n}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat([sd[f"{src}attn1.to_{x}.{p}"] for x in "qkv"])
            out[f"{dst}attn.proj.{p}"] = sd[f"{src}attn1.to_out.0.{p}"]
            out[f"{dst}mlp.fc1.{p}"] = sd[f"{src}ff.net.0.proj.{p}"]
            out[f"{dst}mlp.fc2.{p}"] = sd[f"{src}ff.net.2.{p}"]
            out[f"{dst}adaLN_modulation.1.{p}"] = sd[f"{src}norm1.linear.{p}"]
    return out


# ------------------------------------------------------------------------------------------ config
def _config_from_state_dict(sd: Mapping[str, Tensor], num_attention_heads: int | None,
                            sample_size: int | None) -> dict[str, Any]:
    """SDT-P's size fields from an original-layout DiT state dict (heads from DiT's sizes when not given)."""
    dim, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)
    if depth == 0:
        raise ConfigError("the DiT state dict has no blocks.N.* weights")
    if num_attention_heads is None:
        sizes = {(layers, width): heads for layers, width, heads in MODEL_SIZES.values()}
        if (depth, dim) not in sizes:
            raise ConfigError(f"a DiT of {depth} blocks and width {dim} is not one of DiT's sizes: give "
                              f"num_attention_heads (--num-attention-heads)")
        num_attention_heads = sizes[depth, dim]
    if dim % num_attention_heads:
        raise ConfigError(f"num_attention_heads={num_attention_heads} does not divide the DiT's width {dim}")
    if "pos_embed" in sd:
        grid = math.isqrt(sd["pos_embed"].shape[-2])
        if sample_size is not None and sample_size != grid * patch:
            raise ConfigError(f"sample_size={sample_size} contradicts the checkpoint's pos_embed ({grid}x{grid} "
                              f"patches of {patch}: sample_size {grid * patch})")
        sample_size = grid * patch
    elif sample_size is None:
        raise ConfigError("the DiT checkpoint has no pos_embed: give sample_size (--sample-size, latent pixels, "
                          "32 for 256x256 images)")
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(f"the DiT predicts {out_channels} channels from {in_channels}; SDT-P predicts "
                          f"{in_channels} (epsilon) or {2 * in_channels} (epsilon and variance)")
    return {
        "num_attention_heads": num_attention_heads, "attention_head_dim": dim // num_attention_heads,
        "in_channels": in_channels, "num_layers": depth, "sample_size": sample_size, "patch_size": patch,
        "num_embeds_ada_norm": sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        "learn_sigma": out_channels == 2 * in_channels,
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
    }


def _sdt_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original DiT key names -> SDT-P's (``pos_embed`` is a fixed buffer in both and not copied)."""
    renames = (("x_embedder.proj.", "x_embedder."), ("t_embedder.mlp.0.", "emb.timestep_embedder.linear_1."),
               ("t_embedder.mlp.2.", "emb.timestep_embedder.linear_2."),
               ("y_embedder.embedding_table.", "emb.class_embedder."), (".mlp.fc1.", ".mlp.0."), (".mlp.fc2.", ".mlp.2."))
    out = {}
    for key, value in sd.items():
        if key == "pos_embed":
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def _make_inert(model: SDTTransformer2DModel, generator: torch.Generator) -> None:
    """Initialise the switched-on SDA parts so that the model computes DiT's function (up to the decay's ~1e-7)."""
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            if attn.lpe is not None:  # LPE(V) = 0
                attn.lpe.weight.zero_()
                attn.lpe.bias.zero_()
            attn.init_gates(output_gate="unit", decay_gate="zero", generator=generator)  # U = 1, W_g = 0
            if attn.gate is not None:  # G = logsigmoid(16): a decay of ~1e-7 per unit of distance
                attn.gate.bias.fill_(INERT_GATE_LOGIT)


# ------------------------------------------------------------------------------------------ convert
def convert_dit(
    source: str | Path | DiTTransformer2DModel | Mapping[str, Tensor],
    *,
    decay_mode: str = "none",
    use_lpe: bool = False,
    use_output_gate: bool = False,
    use_rope: bool = False,
    take_block0_embedder: bool = False,
    num_attention_heads: int | None = None,
    sample_size: int | None = None,
    vae: AutoencoderKL | str | Path | None = None,
    scheduler: Any = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_overrides: Any,
):
    """Convert DiT weights to an ``SDTTransformer2DModel`` (or an ``SDTPipeline`` when a VAE is given or found).

    Args:
        source: a diffusers ``DiTTransformer2DModel``, a diffusers DiT model or pipeline folder, an original DiT
            checkpoint file (``DiT-XL-2-256x256.pt``) or its state dict.
        decay_mode: SDT-P's decay, one of :data:`CONVERTIBLE_DECAY_MODES`; ``"none"`` (default) keeps DiT's
            attention, the others start from a decay of ~1e-7 per unit of distance.
        use_lpe, use_output_gate: switch on LPE / the output gate, initialised to 0 / exactly 1.
        use_rope: switch on 2D RoPE; this changes the function (warned).
        take_block0_embedder: for a diffusers DiT whose per-block embedders differ, take block 0's instead of
            refusing (the result is then a different function).
        num_attention_heads: heads of an original checkpoint (default: from DiT's sizes by depth and width).
        sample_size: latent size of an original checkpoint without ``pos_embed``.
        vae: an ``AutoencoderKL`` or its folder: return an ``SDTPipeline``; a diffusers pipeline folder's
            ``vae/`` is used when none is given.
        scheduler: the pipeline's scheduler (default: the pipeline folder's, else DiT's DDPM,
            ``sdt_diffusion.default_scheduler()``).
        dtype: dtype of the returned weights.
        seed: seed of the output gate's symmetry-breaking (``W_u2``'s column pairs).
        config_overrides: further ``SDTTransformer2DModel`` fields (e.g. ``class_dropout_prob``, ``alpha``).
    """
    _check_arguments(decay_mode, dtype, config_overrides, use_lpe=use_lpe, use_output_gate=use_output_gate,
                     use_rope=use_rope, take_block0_embedder=take_block0_embedder,
                     num_attention_heads=num_attention_heads, sample_size=sample_size)
    state, size, heads, sample_size, pipeline_root = _read_source(source, take_block0_embedder,
                                                                  num_attention_heads, sample_size)
    if use_rope:
        warnings.warn("use_rope=True rotates Q and K: the converted model is no longer DiT's function and needs "
                      "fine-tuning", stacklevel=2)

    config = {**_config_from_state_dict(state, heads, sample_size), **size, "decay_mode": decay_mode,
              "use_rope": use_rope, "use_lpe": use_lpe, "use_output_gate": use_output_gate,
              "use_abs_pos_embed": True, **config_overrides}
    try:
        model = SDTTransformer2DModel(**config).to(dtype)
    except ValueError as e:
        raise ConfigError(f"the DiT's config does not build an SDT-P model: {e}") from e
    _load_weights(model, _sdt_state_dict(state), state.get("pos_embed"))  # copied into `dtype`, no detour
    _make_inert(model, torch.Generator().manual_seed(seed))
    model.eval()
    return _maybe_pipeline(model, vae, scheduler, pipeline_root)


def _check_arguments(decay_mode: str, dtype: Any, overrides: Mapping[str, Any], **values: Any) -> None:
    """Refuse bad :func:`convert_dit` arguments by name, before anything is read or built."""
    if decay_mode not in CONVERTIBLE_DECAY_MODES:
        decay_mode_spec(decay_mode)  # an unknown name: the error lists every mode
        raise ConfigError(f"decay_mode {decay_mode!r} cannot start from DiT's function; choose one of "
                          f"{list(CONVERTIBLE_DECAY_MODES)} ('fixed' has no gate to make it inert, 'decomposed' "
                          f"attends along rows then columns, not over the whole grid)")
    for name in ("use_lpe", "use_output_gate", "use_rope", "take_block0_embedder"):
        if not isinstance(values[name], bool):
            raise ConfigError(f"{name} must be True or False, got {values[name]!r}")
    for name in ("num_attention_heads", "sample_size"):
        if values[name] is not None:
            try:
                check_int(name, values[name], minimum=1)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    fixed = {"decay_mode", "use_lpe", "use_output_gate", "use_rope", "use_abs_pos_embed", "freq_shift", "norm_eps"}
    if fixed & set(overrides):
        raise ConfigError(f"{sorted(fixed & set(overrides))} are set by the conversion, not by overrides")


def _read_source(source: Any, take_block0: bool, heads: int | None, sample_size: int | None):
    """``(state dict under DiT's key names, freq_shift/norm_eps fields, heads, sample_size, pipeline root)``."""
    pipeline_root = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            source = _load_original(path)
        elif path.is_dir():
            source, pipeline_root = _load_diffusers(path)
        else:
            raise ConfigError(f"DiT source {str(path)!r} does not exist")
    if isinstance(source, DiTTransformer2DModel):
        _check_diffusers_dit(source)
        _shared_embedder(source, take_block0)
        cfg = source.config
        fields = {"freq_shift": 1, "norm_eps": float(cfg.norm_eps)}  # diffusers' k/127 and its pre-MLP eps
        return diffusers_to_dit_state_dict(source), fields, cfg.num_attention_heads, cfg.sample_size, pipeline_root
    if isinstance(source, Mapping):
        if "x_embedder.proj.weight" not in source:
            raise ConfigError("the DiT state dict has no 'x_embedder.proj.weight': not DiT's key names")
        return dict(source), {"freq_shift": 0, "norm_eps": 1e-6}, heads, sample_size, pipeline_root
    raise ConfigError(f"source must be a diffusers DiTTransformer2DModel, a folder, a .pt file or a state dict, "
                      f"got {type(source).__name__}")


def _load_weights(model: SDTTransformer2DModel, weights: dict[str, Tensor], pos_embed: Tensor | None) -> None:
    """Load DiT's weights; only the SDA parts may be missing, nothing may be left over or mis-shaped."""
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ConfigError(f"DiT weights do not fit the converted config: {bad[:3]}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    sda = (".attn.lpe.", ".attn.gate_down.", ".attn.gate_up.", ".attn.gate.")
    missing = [k for k in missing if not any(part in k for part in sda)]
    if missing or unexpected:
        raise ConfigError(f"DiT weights do not match SDT-P's layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if pos_embed is not None:
        error = (pos_embed.double().reshape(model.pos_embed.shape) - model.pos_embed.double()).abs().max().item()
        if error > 1e-4:
            raise ConfigError(f"the checkpoint's pos_embed differs from DiT's sin-cos table by {error:.2g}: not a DiT "
                              f"position embedding on a {model.config.sample_size // model.config.patch_size}^2 grid")


def _maybe_pipeline(model: SDTTransformer2DModel, vae: Any, scheduler: Any, root: Path | None):
    """The model alone, or an ``SDTPipeline`` around it when a VAE is given or the source folder has one."""
    from ..pipelines import SDTPipeline  # the pipeline imports the models package

    if vae is None and root is not None and (root / "vae").is_dir():
        vae = root / "vae"
    if vae is None:
        if scheduler is not None:
            raise ConfigError("a scheduler was given without a VAE: a pipeline needs both (give vae)")
        return model
    if isinstance(vae, (str, Path)):
        if not Path(vae, "config.json").is_file():
            raise ConfigError(f"VAE folder {str(vae)!r} has no config.json")
        vae = AutoencoderKL.from_pretrained(vae)
    if isinstance(scheduler, (str, Path)) or (scheduler is None and root is not None and (root / "scheduler").is_dir()):
        scheduler = _load_scheduler(Path(scheduler) if scheduler is not None else root / "scheduler")
    id2label = None  # facebook/DiT-XL-2-256's model_index.json carries the ImageNet class names
    if root is not None and (root / "model_index.json").is_file():
        id2label = json.loads((root / "model_index.json").read_text()).get("id2label")
    return SDTPipeline(transformer=model, vae=vae.to(model.dtype), scheduler=scheduler,
                       id2label=id2label if isinstance(id2label, dict) else None)


def _load_scheduler(folder: Path) -> Any:
    """A diffusers scheduler from its folder (``scheduler_config.json``'s ``_class_name``)."""
    import diffusers

    config = folder / "scheduler_config.json"
    if not config.is_file():
        raise ConfigError(f"scheduler folder {str(folder)!r} has no scheduler_config.json")
    name = json.loads(config.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ConfigError(f"{str(config)!r} names an unknown diffusers scheduler {name!r}")
    return cls.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    """``sdt-convert-dit``'s flags."""
    p = argparse.ArgumentParser(
        prog="sdt-convert-dit",
        description="Convert DiT weights (a diffusers DiT folder or DiT's original .pt) into an SDT-P model folder, "
                    "or a full SDTPipeline when a VAE is given or found beside the DiT.")
    p.add_argument("source", help="diffusers DiT folder (model or pipeline) or DiT checkpoint file (.pt)")
    p.add_argument("--output-dir", required=True, help="folder to save the converted model or pipeline in")
    p.add_argument("--decay-mode", default="none", choices=CONVERTIBLE_DECAY_MODES,
                   help="SDT-P decay; not 'none': starts at a decay of ~1e-7 per unit of distance (default: %(default)s)")
    p.add_argument("--lpe", action="store_true", help="switch LPE on, initialised to zero")
    p.add_argument("--output-gate", action="store_true", help="switch the output gate on, initialised to exactly 1")
    p.add_argument("--rope", action="store_true", help="switch 2D RoPE on (changes the function: fine-tune)")
    p.add_argument("--take-block0-embedder", action="store_true",
                   help="diffusers DiT whose per-block embedders differ: take block 0's instead of refusing")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="heads of an original checkpoint (default: from DiT's sizes by depth and width)")
    p.add_argument("--sample-size", type=int, default=None, help="latent size of a checkpoint without pos_embed (default: from its pos_embed)")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder: save a full SDTPipeline (default: the source's vae/, else none)")
    p.add_argument("--scheduler", default=None, help="scheduler folder (default: the source's, else DiT's DDPM)")
    add_dtype_argument(p, "float32", "dtype of the saved weights")
    return p


def main(argv: list[str] | None = None) -> int:
    """``sdt-convert-dit``: convert, save, and print what was written."""
    args = build_parser().parse_args(argv)
    try:
        out = Path(args.output_dir)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--output-dir {str(out)!r} exists and is not empty")
        result = convert_dit(
            args.source, decay_mode=args.decay_mode, use_lpe=args.lpe, use_output_gate=args.output_gate,
            use_rope=args.rope, take_block0_embedder=args.take_block0_embedder,
            num_attention_heads=args.num_attention_heads, sample_size=args.sample_size, vae=args.vae,
            scheduler=args.scheduler, dtype=torch_dtype(args.dtype))
    except ConfigError as e:
        print(f"sdt-convert-dit: error: {e}", file=sys.stderr)
        return 2
    result.save_pretrained(out)
    print(f"saved {type(result).__name__} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
