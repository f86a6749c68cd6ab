"""Fused spatial-decay attention ("augmented", "dense", "flex") against the dense "math" reference.

float64 on CPU: outputs and every gradient (q, k, v, W_g through the gates) at the functional level and
through whole tiny models; bf16 forward within a documented tolerance; "auto" resolution per device.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import forward_backward

from sdt_diffusion import SDTTransformer2DModel
from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.backends import (
    ATTENTION_BACKENDS,
    DENSE_MAX_TOKENS_CPU,
    DecayInputs,
    augment_qk,
    augmented_attention,
    auto_backend_name,
    available_backends,
    dense_attention,
    flex_decay_attention,
    flex_score_mod,
    math_attention,
    resolve_backend,
)
from sdt_diffusion.models.spatial_decay_attention import use_reference_path

GRIDS = [(4, 4), (3, 5), (1, 6), (5, 2)]
ALL_MODES = ("none", "fixed", "1d", "bidirectional", "decomposed", "cdsf")


def problem(height: int, width: int, mode: str, head_dim: int = 8, batch: int = 2, heads: int = 3, dim: int = 12,
            dtype: torch.dtype = torch.float64, seed: int = 0, gate_scale: float = 1.0):
    """Leaf tensors q, k, v (B, N, L, d), tokens X (B, L, D) and W_g (D, 2N), and a function building DecayInputs."""
    g = torch.Generator().manual_seed(seed)
    seq = height * width
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    x = torch.randn(batch, seq, dim, generator=g, dtype=dtype)
    w_g = (gate_scale * torch.randn(dim, 2 * heads, generator=g, dtype=dtype)).requires_grad_()

    def decay() -> DecayInputs:
        logits = x @ w_g  # F = X W_g (eq. 4)
        return DecayInputs(mode, height, width, 0.1, gates=eq.context_aware_gates(logits[..., :heads]),
                           gate_logits_h=logits[..., :heads], gate_logits_w=logits[..., heads:],
                           log_gamma=eq.rmt_log_gamma(heads).to(dtype))

    return (q, k, v, w_g), decay


def outputs_and_grads(fn, leaves, decay):
    out = fn(*leaves[:3], decay())
    grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
    return out, grads


# ---------------------------------------------------------------------------------------------- the identity
@pytest.mark.parametrize("height, width", [*GRIDS, (1, 1), (16, 16)])
def test_threshold_codes_reproduce_manhattan_distance(height, width):
    codes = eq.threshold_codes(height, width, dtype=torch.float64)
    assert codes.shape == (height * width, height + width - 2)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    dist = 0.5 * codes.shape[-1] - 0.5 * codes @ codes.T  # d(i, j) = K - 1/2 V_i . V_j
    torch.testing.assert_close(dist, eq.manhattan_distance(height, width).double(), rtol=0, atol=0)


@pytest.mark.parametrize("height, width", GRIDS)
def test_feature_dot_products_equal_the_bias_up_to_a_row_constant(height, width):
    b, n = 2, 3
    gates = F.logsigmoid(3 * torch.randn(b, n, height * width, dtype=torch.float64))
    codes = eq.threshold_codes(height, width, dtype=torch.float64)
    rates = eq.cdsf_rates(gates, 0.1)
    implied = eq.decay_query_features(rates, codes) @ eq.decay_key_features(rates, codes).transpose(-1, -2)
    bias = eq.spatial_decay_bias(gates.transpose(1, 2).reshape(b, height, width, n), 0.1)
    residual = implied - bias  # must depend on the query i only
    torch.testing.assert_close(residual, residual[..., :1].expand_as(residual), rtol=0, atol=1e-12)

    log_gamma = eq.rmt_log_gamma(n).double()
    implied = eq.fixed_query_features(log_gamma, codes) @ codes.T
    residual = implied - eq.fixed_decay_bias(log_gamma, height, width)
    torch.testing.assert_close(residual, residual[..., :1, :1].expand_as(residual), rtol=0, atol=1e-12)


def test_bf16_features_are_exact_products_of_rounded_rates():
    """In bf16 the only rounding is that of the rates a: the implied bias is exactly (a_i + a_j) d(i, j) + r_i."""
    height, width = 16, 16
    gates = F.logsigmoid(4 * torch.randn(2, 3, height * width, dtype=torch.float64))
    rates = eq.cdsf_rates(gates, 0.1).bfloat16()
    codes = eq.threshold_codes(height, width)
    f_q, f_k = eq.decay_query_features(rates, codes), eq.decay_key_features(rates, codes)
    assert f_q.dtype == f_k.dtype == torch.bfloat16
    implied = f_q.double() @ f_k.double().transpose(-1, -2)
    a = rates.double()
    exact = (a[..., :, None] + a[..., None, :]) * eq.manhattan_distance(height, width).double()
    residual = implied - exact
    torch.testing.assert_close(residual, residual[..., :1].expand_as(residual), rtol=0, atol=1e-12)


def test_augmented_width_is_padded_to_a_multiple_of_8():
    (q, k, _, _), decay = problem(16, 16, "cdsf", head_dim=72)
    q_aug, k_aug = augment_qk(q, k, decay())
    assert q_aug.shape[-1] == k_aug.shape[-1] == 136  # 72 + (1 + 2 * 30) = 133, padded to a multiple of 8
    torch.testing.assert_close(q_aug[..., :72], q, rtol=0, atol=0)


def test_rope_tables_equal_apply_rope_bitwise():
    angles = eq.rope_2d_angles(3, 5, 72)
    x = torch.randn(2, 4, 15, 72)
    expected = eq.apply_rope(x, angles.cos(), angles.sin())
    assert torch.equal(eq.apply_rope_tables(x, *eq.rope_tables(angles)), expected)


# ---------------------------------------------------------------------------------------------- functional, float64
@pytest.mark.parametrize("backend", [augmented_attention, dense_attention], ids=["augmented", "dense"])
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("height, width, head_dim", [(4, 4, 8), (3, 5, 72), (1, 6, 8), (5, 2, 16)])
def test_fused_equals_math_outputs_and_all_gradients(backend, mode, height, width, head_dim):
    leaves, decay = problem(height, width, mode, head_dim)
    ref_out, ref_grads = outputs_and_grads(math_attention, leaves, decay)
    out, grads = outputs_and_grads(backend, leaves, decay)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for name, g, ref in zip(("q", "k", "v", "W_g"), grads, ref_grads):
        if ref is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{mode} d{n}: {m}")
    if mode in ("cdsf", "1d", "bidirectional", "decomposed"):
        assert ref_grads[3].abs().sum() > 0  # the gradient reaches W_g


@pytest.mark.parametrize("backend", [augmented_attention, dense_attention], ids=["augmented", "dense"])
def test_fused_with_large_gates_float64(backend):
    """Strongly negative gates (G down to about -10): still exact in float64."""
    leaves, decay = problem(6, 7, "cdsf", head_dim=16, gate_scale=4.0)
    ref_out, ref_grads = outputs_and_grads(math_attention, leaves, decay)
    out, grads = outputs_and_grads(backend, leaves, decay)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", [augmented_attention, dense_attention], ids=["augmented", "dense"])
def test_fused_saves_no_l_by_l_tensor_for_backward(backend):
    """The fused paths keep nothing of size L x L per sample or head for the backward pass (float32: SDPA's
    flash kernel on CPU); ``dense`` keeps the grid's one distance matrix, which all layers share."""
    height, width = 8, 8
    leaves, decay = problem(height, width, "cdsf", head_dim=16, dtype=torch.float32)
    seq = height * width
    distance = eq.manhattan_distance(height, width)
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t is not distance:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs = decay()
        inputs.distance = distance
        backend(*leaves[:3], inputs)
    assert shapes, "nothing saved: the check would be vacuous"
    assert not [s for s in shapes if len(s) >= 2 and s[-2:] == (seq, seq)], shapes
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        math_attention(*leaves[:3], decay())
    assert [s for s in shapes if len(s) >= 2 and s[-2:] == (seq, seq)]  # while the reference does


# ---------------------------------------------------------------------------------------------- flex
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("height, width, head_dim", [(3, 5, 72), (4, 4, 8)])
def test_flex_score_mod_forward_equals_math_eager(mode, height, width, head_dim):
    """The score_mods, through PyTorch's eager (unfused) FlexAttention on CPU, float64."""
    leaves, decay = problem(height, width, mode, head_dim)
    with torch.no_grad():
        ref = math_attention(*leaves[:3], decay())
        out = flex_decay_attention(*leaves[:3], decay(), compiled=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["cdsf", "1d", "bidirectional"])
def test_flex_gate_gradients_through_captured_tensors_eager(mode):
    """Gradients into the captured gate tensors (q, k, v held fixed: CPU FlexAttention has no q/k/v backward).

    Eager FlexAttention with gradients traces itself with Dynamo; in torch 2.14 that trace fails once
    automatic dynamic shapes kick in (after calls with other shapes), hence static shapes here.
    """
    from torch.nn.attention.flex_attention import flex_attention

    leaves, decay = problem(3, 5, mode, head_dim=8)
    q, k, v, w_g = leaves
    q, k, v = q.detach(), k.detach(), v.detach()
    ref = torch.autograd.grad(math_attention(q, k, v, decay()).square().sum(), w_g)[0]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        out = flex_attention(q, k, v, score_mod=flex_score_mod(decay()))
    grad = torch.autograd.grad(out.square().sum(), w_g)[0]
    torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-11)


def test_flex_refuses_training_on_cpu_with_a_clear_error():
    leaves, decay = problem(3, 5, "cdsf")
    with pytest.raises(NotImplementedError, match="no CPU backward.*augmented"):
        ATTENTION_BACKENDS["flex"](*leaves[:3], decay())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cdsf", "fixed"])
def test_flex_compiled_forward_on_cpu_head_width_72(mode):
    """The registered backend: torch.compile'd FlexAttention (CPU inference), 3 x 5 grid, head width 72, float32."""
    leaves, decay = problem(3, 5, mode, head_dim=72, dtype=torch.float32)
    with torch.no_grad():
        ref = math_attention(*leaves[:3], decay())
        out = ATTENTION_BACKENDS["flex"](*leaves[:3], decay())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- whole models
# Without DiT's absolute embedding (use_abs_pos_embed=False): the backends must agree on any grid, 3 x 5 included,
# and only the resolution-free model runs on a grid other than its sample_size's.
TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, patch_size=2,
            num_embeds_ada_norm=10, gate_rank=4, lpe_kernel_size=3, class_dropout_prob=0.0, use_abs_pos_embed=False)


def randomised_pair(backend: str, **overrides):
    """A float64 model with the "math" backend on the plain reference path and a copy with ``backend`` on the
    default (fast) path; adaLN-Zero and W_g randomised."""
    config = {**TINY, **overrides}
    torch.manual_seed(0)
    ref = SDTTransformer2DModel(**config, attention_backend="math").double()
    use_reference_path(ref)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name or "attn.gate." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    fast = SDTTransformer2DModel(**config, attention_backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def model_inputs(batch: int, height: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 10, (batch,), generator=g)


@pytest.mark.parametrize("backend", ["augmented", "dense"])
@pytest.mark.parametrize("mode", ["cdsf", "fixed"])
@pytest.mark.parametrize("latent_hw, overrides", [
    ((8, 8), {}),  # 4 x 4 tokens, 2 layers, head width 8
    ((6, 10), {}),  # 3 x 5 tokens
    ((6, 10), {"num_layers": 1, "attention_head_dim": 72}),  # head width 72 (XL's), non-square grid
])
def test_model_fused_equals_math_every_parameter_gradient(backend, mode, latent_hw, overrides):
    ref, fast = randomised_pair(backend, decay_mode=mode, **overrides)
    x, t, y = model_inputs(2, *latent_hw)
    outs, grads = zip(*(forward_backward(model, x, t, y) for model in (ref, fast)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    for name, g in grads[0].items():
        assert g is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-8, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    if mode == "cdsf":
        assert grads[0]["blocks.0.attn.gate.weight"].abs().sum() > 0


def test_model_flex_inference_eager_equals_math(monkeypatch):
    """A whole model on the flex score_mods (eager path, CPU, no grad), 3 x 5 tokens, head width 72."""
    import sdt_diffusion.attention.backends as ab

    monkeypatch.setitem(ab.ATTENTION_BACKENDS, "flex", lambda q, k, v, d: ab.flex_decay_attention(q, k, v, d, False))
    ref, fast = randomised_pair("flex", num_layers=1, attention_head_dim=72)
    x, t, y = model_inputs(2, 6, 10)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, y).sample, ref(x, t, y).sample, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- bf16
# Tolerance, measured on CPU for a 16 x 16 grid, 6 heads of width 64, gates from logits ~ N(0, 1)
# (docs/performance.md): bf16 q/k/v against the float64 math reference, mean |error| ~3e-4 and
# max ~1e-2 for both "augmented" and the dense "sdpa" path; the augmented dims add no more error
# than casting the dense bias to bf16 does.
BF16_MEAN_ATOL = 1e-3
BF16_MAX_ATOL = 3e-2


def bf16_errors(backend: str, gate_scale: float = 1.0) -> tuple[float, float]:
    (q, k, v, w_g), decay = problem(16, 16, "cdsf", head_dim=64, batch=2, heads=6, dim=32, gate_scale=gate_scale)
    with torch.no_grad():
        ref = math_attention(q, k, v, decay())
        d = decay()
        d.gates = d.gates.float()
        out = ATTENTION_BACKENDS[backend](q.bfloat16(), k.bfloat16(), v.bfloat16(), d)
    err = (out.double() - ref).abs()
    return err.mean().item(), err.max().item()


@pytest.mark.parametrize("backend", ["augmented", "dense"])
@pytest.mark.parametrize("gate_scale", [0.0, 1.0])
def test_bf16_fused_within_tolerance_and_no_worse_than_dense_bias(backend, gate_scale):
    aug_mean, aug_max = bf16_errors(backend, gate_scale)
    dense_mean, _ = bf16_errors("sdpa", gate_scale)
    assert aug_mean < BF16_MEAN_ATOL and aug_max < BF16_MAX_ATOL, (aug_mean, aug_max)
    assert aug_mean < 1.2 * dense_mean, (aug_mean, dense_mean)


def test_bf16_model_forward_close_to_float32():
    torch.manual_seed(0)
    model = SDTTransformer2DModel(**{**TINY, "attention_head_dim": 16}, attention_backend="augmented")
    ref_model = SDTTransformer2DModel(**{**TINY, "attention_head_dim": 16}, attention_backend="math")
    ref_model.load_state_dict(model.state_dict())
    x, t, y = model_inputs(2, 8, 8)
    x = x.float()
    with torch.no_grad():
        ref = ref_model(x, t, y).sample
        out = model.to(torch.bfloat16)(x.bfloat16(), t, y).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


# ---------------------------------------------------------------------------------------------- auto and names
def test_new_backends_are_accepted_by_the_model():
    assert {"augmented", "dense", "flex", "auto", "math", "sdpa"} <= set(available_backends())
    for name in ("augmented", "dense", "flex"):
        SDTTransformer2DModel(**TINY, attention_backend=name)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("mode, expected", [
    ("cdsf", "augmented"), ("fixed", "augmented"), ("none", "sdpa"),
    ("1d", "sdpa"), ("bidirectional", "sdpa"), ("decomposed", "sdpa"),
])
def test_auto_resolution_per_device(device, mode, expected):
    assert auto_backend_name(torch.device(device), mode) == expected
    assert resolve_backend("auto", torch.device(device), mode) is ATTENTION_BACKENDS[expected]


@pytest.mark.parametrize("device, mode, tokens, expected", [
    ("cpu", "cdsf", 256, "dense"), ("cpu", "fixed", DENSE_MAX_TOKENS_CPU, "dense"), ("cpu", "cdsf", 1024, "dense"),
    ("cpu", "cdsf", DENSE_MAX_TOKENS_CPU + 1, "augmented"), ("cpu", "cdsf", 4096, "augmented"),
    ("cuda", "cdsf", 256, "augmented"), ("cpu", "none", 256, "sdpa"), ("cpu", "1d", 256, "sdpa"),
])
def test_auto_resolution_by_token_count(device, mode, tokens, expected):
    """On CPU the dense path (width d, recomputing backward) up to DENSE_MAX_TOKENS_CPU tokens."""
    assert auto_backend_name(torch.device(device), mode, tokens) == expected
    assert resolve_backend("auto", torch.device(device), mode, tokens) is ATTENTION_BACKENDS[expected]


def test_auto_model_is_exact():
    ref, fast = randomised_pair("auto")
    x, t, y = model_inputs(2, 8, 8)
    torch.testing.assert_close(fast(x, t, y).sample, ref(x, t, y).sample, rtol=1e-10, atol=1e-12)


def test_scale_folding_uses_the_head_width_of_q():
    """The sqrt(d) folded into the query features uses d of q, not of the augmented width."""
    (q, k, v, _), decay = problem(4, 4, "cdsf", head_dim=8)
    q_aug, k_aug = augment_qk(q, k, decay())
    scores = q_aug @ k_aug.transpose(-1, -2) / math.sqrt(8)
    bias = eq.spatial_decay_bias(decay().gates.reshape(2, 4, 4, 3), 0.1)
    expected = q @ k.transpose(-1, -2) / math.sqrt(8) + bias
    residual = scores - expected
    torch.testing.assert_close(residual, residual[..., :1].expand_as(residual), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------- CUDA (skipped here)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_problem(mode: str, head_dim: int, dtype: torch.dtype, height: int = 16, width: int = 16):
    leaves, decay = problem(height, width, mode, head_dim, batch=2, heads=4, dim=16, dtype=torch.float64)
    dev = [t.detach().to("cuda", dtype).requires_grad_() for t in leaves[:3]]
    w_g = leaves[3].detach().cuda().requires_grad_()  # gates stay float32 or wider, as in the model
    x = torch.randn(2, height * width, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).cuda()

    def make_decay() -> DecayInputs:
        logits = x @ w_g
        return DecayInputs(mode, height, width, 0.1, gates=eq.context_aware_gates(logits[..., :4]).float(),
                           log_gamma=eq.rmt_log_gamma(4).cuda())

    return [*dev, w_g], make_decay


@cuda_only
@pytest.mark.parametrize("backend", ["augmented", "dense", "flex"])
@pytest.mark.parametrize("mode", ["cdsf", "fixed"])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_cuda_fused_backends_match_math_float32(backend, mode, head_dim):
    leaves, decay = cuda_problem(mode, head_dim, torch.float32)
    ref_out, ref_grads = outputs_and_grads(math_attention, leaves, decay)
    out, grads = outputs_and_grads(ATTENTION_BACKENDS[backend], leaves, decay)
    torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-4)  # TF32 / kernel accumulation order
    for g, ref in zip(grads, ref_grads):
        if ref is not None:
            torch.testing.assert_close(g, ref, rtol=1e-2, atol=1e-3)


@cuda_only
@pytest.mark.parametrize("backend", ["augmented", "dense", "flex", "sdpa"])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_cuda_bf16_forward_within_tolerance(backend, head_dim):
    leaves, decay = cuda_problem("cdsf", head_dim, torch.bfloat16)
    with torch.no_grad():
        ref = math_attention(*(t.double() for t in leaves[:3]), decay())
        out = ATTENTION_BACKENDS[backend](*leaves[:3], decay())
    err = (out.double() - ref).abs()
    assert err.mean() < BF16_MEAN_ATOL and err.max() < BF16_MAX_ATOL, (err.mean().item(), err.max().item())


@cuda_only
def test_cuda_auto_training_step_bf16_autocast():
    model = SDTTransformer2DModel(**{**TINY, "attention_head_dim": 72, "num_layers": 1}).cuda()
    assert auto_backend_name(torch.device("cuda"), "cdsf") == "augmented"
    x, t, y = (v.cuda() for v in model_inputs(2, 8, 8))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x.float(), t, y).sample
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
