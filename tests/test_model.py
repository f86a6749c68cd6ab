"""SDTTransformer2DModel: presets, equivalence of backends, diffusers conventions, input checks, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from conftest import forward_backward

from sdt_diffusion import DECAY_MODES, PRESETS, SDTTransformer2DModel, count_parameters
from sdt_diffusion.attention.grid import GridContext
from sdt_diffusion.models.spatial_decay_attention import SpatialDecayAttention, use_reference_path

TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, patch_size=2,
            num_embeds_ada_norm=10, gate_rank=4, lpe_kernel_size=3)


def tiny(**kw) -> SDTTransformer2DModel:
    torch.manual_seed(0)
    return SDTTransformer2DModel(**{**TINY, **kw})


def randomise_zero_init(model: torch.nn.Module, seed: int = 1) -> None:
    """Give adaLN-Zero, the final layer and W_g random weights so every parameter gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name or "attn.gate." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def inputs(batch: int = 3, size: int = 8, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g).to(dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y


# ---------------------------------------------------------------------------------------------- presets
PAPER_COUNTS = {"S": 33e6, "B": 132e6, "L": 462e6, "XL": 679e6}


@pytest.mark.parametrize("size", list(PAPER_COUNTS))
def test_preset_parameter_counts_match_paper(size):
    with init_empty_weights():
        model = SDTTransformer2DModel.from_preset(f"SDT-P-{size}/2")
    n = count_parameters(model)
    assert abs(n - PAPER_COUNTS[size]) / PAPER_COUNTS[size] < 0.01, (size, n)


# DiT's own code, trainable parameters (its pos_embed is a frozen buffer-like parameter, not counted)
DIT_COUNTS = {"S": 32.87e6, "B": 130.32e6, "L": 457.84e6, "XL": 674.83e6}


@pytest.mark.parametrize("size", list(DIT_COUNTS))
def test_every_sda_part_off_has_dits_parameter_count(size):
    with init_empty_weights():
        model = SDTTransformer2DModel.from_preset(f"SDT-P-{size}/2", decay_mode="none", use_rope=False, use_lpe=False,
                                                  use_output_gate=False, use_abs_pos_embed=True)
    assert round(count_parameters(model) / 1e4) == round(DIT_COUNTS[size] / 1e4), size


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name):
    model = SDTTransformer2DModel.from_preset(name, num_layers=1).eval()
    assert model.config.num_attention_heads * model.config.attention_head_dim in (384, 768, 1024, 1152)
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([10]), torch.tensor([3])).sample
    assert out.shape == (1, 8, 32, 32)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        SDTTransformer2DModel.from_preset("SDT-P-M/2")


def test_config_names_follow_dit():
    from diffusers import DiTTransformer2DModel

    shared = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
              "sample_size", "patch_size", "num_embeds_ada_norm"}
    assert shared <= set(DiTTransformer2DModel.load_config.__self__._get_init_keys(DiTTransformer2DModel))
    assert shared <= set(tiny().config)


# ---------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("mode", DECAY_MODES)
def test_sdpa_equals_math_outputs_and_all_gradients(mode):
    ref = tiny(decay_mode=mode, attention_backend="math").double()
    randomise_zero_init(ref)
    fast = tiny(decay_mode=mode, attention_backend="sdpa").double()
    fast.load_state_dict(ref.state_dict())
    x, t, y = inputs(dtype=torch.float64)
    outs, grads = zip(*(forward_backward(model, x, t, y) for model in (ref, fast)))
    torch.testing.assert_close(outs[0], outs[1])
    for name, g in grads[0].items():
        assert g is not None, name
        torch.testing.assert_close(g, grads[1][name], msg=lambda m, n=name: f"{n}: {m}")
    if mode in ("cdsf", "1d", "bidirectional", "decomposed"):
        assert grads[0]["blocks.0.attn.gate.weight"].abs().sum() > 0  # the gradient reaches W_g


def test_auto_backend_matches_math():
    ref = tiny(attention_backend="math")
    randomise_zero_init(ref)
    auto = tiny(attention_backend="auto")
    auto.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    torch.testing.assert_close(ref(x, t, y).sample, auto(x, t, y).sample, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- structure
def test_adaln_zero_init_block_is_identity():
    model = tiny()
    x = torch.randn(2, 16, model.inner_dim)
    c = torch.randn(2, model.inner_dim)
    context = GridContext.build(4, 4, head_dim=model.config.attention_head_dim, decay_mode=model.config.decay_mode,
                                backend="math", use_rope=False)

    block = model.blocks[0]
    torch.testing.assert_close(block(x, c, context), x)
    out = model(*inputs()).sample
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer


def test_class_dropout_only_in_training():
    model = tiny(class_dropout_prob=1.0)
    seen = []
    model.emb.class_embedder.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    x, t, y = inputs()
    model.eval()
    model(x, t, y)
    assert torch.equal(seen[-1], y)
    model.train()
    model(x, t, y)
    assert torch.all(seen[-1] == 10)  # the null label = num_classes
    model.eval()
    model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
    assert seen[-1].tolist() == [10, y[1].item(), 10]


def test_learn_sigma_off_and_out_channels():
    model = tiny(learn_sigma=False)
    assert model(*inputs()).sample.shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match="contradicts learn_sigma"):
        tiny(out_channels=5)


def test_abs_pos_embed_flag():
    model = tiny(use_abs_pos_embed=True)
    assert model.pos_embed.shape == (1, 16, model.inner_dim)
    assert "pos_embed" not in model.state_dict()  # fixed sin-cos, not a weight
    with pytest.raises(ValueError, match="fixes the grid"):
        model(torch.randn(1, 4, 12, 12), 1, 1)


def dit_sincos_table(dim: int, grid: int) -> np.ndarray:
    """DiT's fixed 2D sin-cos table (DiT ``models.py``, ``get_2d_sincos_pos_embed``): positions 0..grid-1, the
    first half of the channels from the column index, the second from the row index, each [sin, cos]."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def axis(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([axis(cols), axis(rows)], axis=1)


@pytest.mark.parametrize("sample_size, patch_size", [(8, 1), (8, 2), (32, 2)])  # grids 8, 4 and 16
def test_abs_pos_embed_uses_dits_grid_positions(sample_size, patch_size):
    # diffusers' default base_size=16 would put an 8x8 grid at positions 0, 2, ..., 14; DiT uses 0..7
    model = tiny(use_abs_pos_embed=True, sample_size=sample_size, patch_size=patch_size)
    grid = sample_size // patch_size
    expected = torch.from_numpy(dit_sincos_table(model.inner_dim, grid)).float()
    torch.testing.assert_close(model.pos_embed[0], expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- initialisation
def test_unit_output_gate_init_starts_the_gate_at_exactly_one():
    model = tiny(output_gate_init="unit")
    x = torch.randn(2, 16, model.inner_dim)
    for block in model.blocks:
        attn = block.attn
        gate = attn.gate_up(torch.sigmoid(attn.gate_down(x)))
        assert torch.equal(gate, torch.ones_like(gate))
        # distinct columns, so the gate does not stay rank 1 under training
        assert torch.linalg.matrix_rank(attn.gate_up.weight.double()) > 1
    default = tiny()
    gate = default.blocks[0].attn.gate_up(torch.sigmoid(default.blocks[0].attn.gate_down(x)))
    # DiT's xavier init: a small random-signed factor
    assert (gate > 0).any() and (gate < 0).any() and gate.abs().mean() < 0.5


@pytest.mark.parametrize("mode", ["cdsf", "bidirectional", "decomposed"])
def test_rmt_decay_gate_init_starts_each_head_at_rmts_gamma(mode):
    from sdt_diffusion.attention import spatial_decay as eq

    model = tiny(decay_mode=mode, decay_gate_init="rmt", fixed_decay_init=2.0, fixed_decay_range=4.0)
    attn = model.blocks[0].attn
    heads = model.config.num_attention_heads
    expected = eq.rmt_log_gamma(heads, 2.0, 4.0).double()  # log(1 - 2^(-2 - 4h/N))
    x = torch.randn(2, 16, model.inner_dim)
    g = eq.context_aware_gates(attn.gate(x)).double()  # (B, L, outputs)
    per_unit = g * (model.config.alpha if mode == "cdsf" else 1.0)  # CDSF's M = alpha G d for equal gates (eq. 8)
    for part in per_unit.split(heads, dim=-1):  # the decomposed decay has one gate per axis
        torch.testing.assert_close(part, expected.expand_as(part), rtol=1e-5, atol=1e-7)
    # the default: W_g = 0 and a zero bias, so every head starts at G = log sigma(0)
    g0 = eq.context_aware_gates(tiny(decay_mode=mode).blocks[0].attn.gate(x))
    torch.testing.assert_close(g0, torch.full_like(g0, math.log(0.5)))


def test_init_switches_are_saved_and_leave_the_other_weights_alone(tmp_path):
    default, changed = tiny(), tiny(output_gate_init="unit", decay_gate_init="rmt")
    touched = ("gate_down", "gate_up", ".attn.gate.")
    for (name, a), (_, b) in zip(default.state_dict().items(), changed.state_dict().items(), strict=True):
        if not any(t in name for t in touched):
            assert torch.equal(a, b), name
    changed.save_pretrained(tmp_path)
    loaded = SDTTransformer2DModel.from_pretrained(tmp_path)
    assert (loaded.config.output_gate_init, loaded.config.decay_gate_init) == ("unit", "rmt")
    for (name, a), (_, b) in zip(changed.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_rmt_decay_gate_init_needs_a_positive_alpha():
    with pytest.raises(ValueError, match="alpha > 0"):
        tiny(decay_gate_init="rmt", alpha=0.0)


# ---------------------------------------------------------------------------------------------- SDA switches
def test_every_sda_part_is_a_switch_saved_in_the_config(tmp_path):
    model = tiny(use_lpe=False, use_output_gate=False, decay_mode="none", use_rope=False)
    keys = set(model.state_dict())
    assert not any(".lpe." in k or "gate_down" in k or "gate_up" in k or ".attn.gate." in k for k in keys)
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"} <= keys
    randomise_zero_init(model)
    model.save_pretrained(tmp_path)
    loaded = SDTTransformer2DModel.from_pretrained(tmp_path)
    assert not loaded.config.use_lpe and not loaded.config.use_output_gate
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, model(x, t, y).sample, rtol=0, atol=0)
    full = tiny()
    lpe, gate = full.config.lpe_kernel_size ** 2 * full.inner_dim + full.inner_dim, 2 * full.config.gate_rank * full.inner_dim
    assert count_parameters(tiny(use_lpe=False)) == count_parameters(full) - 2 * lpe
    assert count_parameters(tiny(use_output_gate=False)) == count_parameters(full) - 2 * gate


@pytest.mark.parametrize("switches", [{"use_lpe": False}, {"use_output_gate": False},
                                      {"use_lpe": False, "use_output_gate": False, "decay_mode": "none"}])
def test_switched_off_parts_fast_path_equals_reference_path(switches):
    model = tiny(**switches).double().eval()
    randomise_zero_init(model)
    x, t, y = inputs(dtype=torch.float64)
    fast = model(x, t, y).sample
    use_reference_path(model)
    torch.testing.assert_close(model(x, t, y).sample, fast, rtol=1e-12, atol=1e-12)


def test_a_switched_off_part_removes_exactly_its_term():
    """Without LPE the attention output is U * attn; without the gate it is attn + LPE(V) (eq. 13)."""
    torch.manual_seed(0)
    full = SpatialDecayAttention(16, 2, decay_mode="none", gate_rank=4, lpe_kernel_size=3).double()
    context = GridContext.build(4, 4, head_dim=8, decay_mode="none", backend="math", use_rope=True)
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    for switch, module in (("use_lpe", "lpe"), ("use_output_gate", "gate_up")):
        part = SpatialDecayAttention(16, 2, decay_mode="none", gate_rank=4, lpe_kernel_size=3, **{switch: False})
        part = part.double()
        part.load_state_dict(full.state_dict(), strict=False)
        with torch.no_grad():  # the same layer with that term zeroed
            reference = SpatialDecayAttention(16, 2, decay_mode="none", gate_rank=4, lpe_kernel_size=3).double()
            reference.load_state_dict(full.state_dict())
            if module == "lpe":
                reference.lpe.weight.zero_()
                reference.lpe.bias.zero_()
            else:  # U = 1: W_u1 = 0, W_u2 = 2 / r
                reference.gate_down.weight.zero_()
                reference.gate_up.weight.fill_(0.5)
            torch.testing.assert_close(part(x, context), reference(x, context), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("freq_shift, denominator", [(0, 128), (1, 127)])
def test_freq_shift_selects_dits_or_diffusers_timestep_frequencies(freq_shift, denominator):
    model = tiny(freq_shift=freq_shift)
    t = torch.tensor([0.0, 250.0, 999.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / denominator)
    args = t.double()[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()
    torch.testing.assert_close(model.emb.time_proj(t), expected, rtol=0, atol=2e-4)


def test_other_resolution_without_abs_pos_embed():
    model = tiny(use_abs_pos_embed=False)
    assert not hasattr(model, "pos_embed")
    assert model(torch.randn(2, 4, 12, 16), 5, 2).sample.shape == (2, 8, 12, 16)


def test_abs_pos_embed_is_the_default_and_fixes_the_grid():
    # DiT's choice, kept by the 2026-12-05 factorial (benchmarks/RESULTS.md, "SDT-P against DiT, part by part")
    model = tiny()
    assert model.config.use_abs_pos_embed is True and model.pos_embed.shape[1] == 16
    assert SDTTransformer2DModel.from_preset("SDT-P-S/2").config.use_abs_pos_embed is True
    with pytest.raises(ValueError, match="use_abs_pos_embed=True fixes the grid to 4\\^2 tokens, got 6x8"):
        model(torch.randn(2, 4, 12, 16), 5, 2)


def test_return_tuple():
    (out,) = tiny()(*inputs(), return_dict=False)
    assert out.shape == (3, 8, 8, 8)


# ---------------------------------------------------------------------------------------------- diffusers conventions
def test_save_load_round_trip_safetensors(tmp_path):
    model = tiny(decay_mode="cdsf", alpha=0.2)
    randomise_zero_init(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = SDTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.alpha == 0.2 and loaded.config.decay_mode == "cdsf"
    x, t, y = inputs()
    torch.testing.assert_close(model.eval()(x, t, y).sample, loaded.eval()(x, t, y).sample, rtol=0, atol=0)
    half = SDTTransformer2DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_casting(dtype):
    model = tiny()
    randomise_zero_init(model)
    x, t, y = inputs()
    ref = model(x, t, y).sample
    out = model.to(dtype)(x.to(dtype), t, y).sample
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_gradient_checkpointing_same_gradients():
    model = tiny()
    randomise_zero_init(model)
    x, t, y = inputs()
    model(x, t, y).sample.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    model(x, t, y).sample.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n])


def precision_critical(param_name: str) -> bool:
    """Whether SDT keeps this parameter in the compute dtype under layerwise casting."""
    module = param_name.rsplit(".", 1)[0]
    return (module == "x_embedder" or module.startswith(("emb.", "final_layer.")) or ".adaLN_modulation." in module
            or module.endswith(".attn.gate"))


def storage_bytes(model: torch.nn.Module, keep: bool) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if precision_critical(n) == keep)


def test_layerwise_casting_keeps_precision_critical_modules():
    model = tiny().eval()
    randomise_zero_init(model)
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y).sample
    cast_bytes = storage_bytes(model, keep=False)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if precision_critical(name) else torch.float8_e4m3fn), name
    kept = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert kept >= {"x_embedder", "emb.timestep_embedder.linear_1", "emb.class_embedder", "blocks.0.adaLN_modulation.1",
                    "blocks.1.attn.gate", "final_layer.linear", "final_layer.adaLN_modulation.1"}
    assert storage_bytes(model, keep=False) * 4 == cast_bytes  # qkv, proj, LPE, output gate, MLP: 1 byte a weight
    with torch.no_grad():
        out = model(x, t, y).sample  # runs on CPU, each cast layer upcast for its forward
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()  # fp8 weights: close, not equal
    assert all(p.dtype == torch.float8_e4m3fn for n, p in model.named_parameters() if not precision_critical(n))


def test_layerwise_casting_footprint_follows_compute_dtype():
    """The kept modules are stored in the compute dtype, so bf16 compute must take less memory than fp32
    compute (the check diffusers' LayerwiseCastingTesterMixin makes); with nothing kept both were equal."""

    def footprint(storage, compute):
        model = tiny().eval().to(compute)
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
        x, t, y = inputs(dtype=compute)
        with torch.no_grad():
            model(x, t, y)
        return model.get_memory_footprint()

    fp32 = footprint(torch.float32, torch.float32)
    fp8_fp32 = footprint(torch.float8_e4m3fn, torch.float32)
    fp8_bf16 = footprint(torch.float8_e4m3fn, torch.bfloat16)
    assert fp8_bf16 < fp8_fp32 < fp32


def test_torch_compile():
    model = tiny().eval()
    randomise_zero_init(model)
    x, t, y = inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y).sample, model(x, t, y).sample, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- input checks
def test_input_checks_name_the_problem():
    model = tiny()
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 4, 7, 8), 1, 1)
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(1, 3, 8, 8), 1, 1)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\]"):
        model(torch.randn(2, 4, 8, 8), 1, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="class_labels must lie"):
        model(torch.randn(2, 4, 8, 8), 1, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="timestep must be a scalar or have shape"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="decay_mode must be one of"):
        tiny(decay_mode="gaussian")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        tiny(attention_backend="triton")
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(attention_head_dim=6)


def test_set_attention_backend_switches_and_saves(tmp_path):
    model = tiny(attention_backend="math").eval()
    randomise_zero_init(model)
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y).sample
        model.set_attention_backend("augmented")
        assert model.config.attention_backend == "augmented"
        assert ref.abs().mean() > 0.1
        torch.testing.assert_close(model(x, t, y).sample, ref, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    assert SDTTransformer2DModel.from_pretrained(tmp_path).config.attention_backend == "augmented"
    model.reset_attention_backend()
    assert model.config.attention_backend == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_attention_backend("flash")  # a diffusers processor name, not one of ours


# ---------------------------------------------------------------------------------------------- learning
def test_tiny_model_overfits_a_handful_of_latents():
    model = tiny(num_attention_heads=4, attention_head_dim=16, learn_sigma=False, class_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    eps = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([100, 300, 500, 700])
    y = torch.tensor([0, 1, 2, 3])
    alpha_bar = torch.cos(t / 1000 * torch.pi / 2)[:, None, None, None] ** 2
    x_t = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * eps
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(250):
        loss = (model(x_t, t, y).sample - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_layers", 1e9, "num_layers must be an integer"),
        ("num_layers", 10**9, "parameters"),
        ("num_layers", 0, "num_layers must be >= 1"),
        ("patch_size", 0, "patch_size must be >= 1"),
        ("alpha", -0.1, "alpha must be >= 0"),
        ("alpha", float("nan"), "alpha must be finite"),
        ("alpha", float("inf"), "alpha must be finite"),
        ("rope_base", -1.0, "rope_base must be > 1"),
        ("fixed_decay_init", 0.0, "fixed_decay_init must be > 0"),
        ("fixed_decay_range", -4.0, "fixed_decay_range must be > 0"),
        ("learn_sigma", "no", "learn_sigma must be true or false"),
        ("class_dropout_prob", 1.5, "class_dropout_prob must be <= 1"),
        ("lpe_kernel_size", 4, "lpe_kernel_size must be odd"),
        ("num_attention_heads", True, "num_attention_heads must be an integer"),
        ("use_lpe", "no", "use_lpe must be true or false"),
        ("use_output_gate", 1, "use_output_gate must be true or false"),
        ("freq_shift", 2, "freq_shift must be <= 1"),
        ("norm_eps", 0.0, "norm_eps must be > 0"),
        ("output_gate_init", "ones", "output_gate_init must be one of"),
        ("decay_gate_init", "gamma", "decay_gate_init must be one of"),
    ],
)
def test_bad_config_values_are_refused_before_building(field, value, message):
    config = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "in_channels": 3,
              "sample_size": 8, "num_embeds_ada_norm": 4, field: value}
    with pytest.raises(ValueError, match=message):
        SDTTransformer2DModel(**config)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_timesteps_are_refused(tiny_transformer, bad):
    model = tiny_transformer
    x = torch.randn(2, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    with pytest.raises(ValueError, match="timestep must be finite"):
        model(x, torch.tensor([1.0, bad]), torch.tensor([0, 1]))
