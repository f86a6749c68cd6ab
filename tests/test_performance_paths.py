"""The fast forward path of Spatial Decay Attention against its plain reference, and the compiled model.

Every fast piece computes the same function as the plain equations: RoPE in place (``kernels.rope_qk``),
LPE's convolution with a written-out CPU backward (``kernels.depthwise_conv_tokens``), the fused input
projection and the module's fast forward (``SpatialDecayAttention``), checked in float64 on outputs and
every gradient.  ``torch.compile(fullgraph=True)`` runs a tiny model's forward and backward without graph
breaks and stays exact.
"""

from __future__ import annotations

import pytest
import torch
from conftest import forward_backward

from sdt_diffusion import SDTTransformer2DModel
from sdt_diffusion.attention import kernels
from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.grid import GridContext
from sdt_diffusion.models.spatial_decay_attention import SpatialDecayAttention, use_reference_path

# Without DiT's absolute embedding (use_abs_pos_embed=False): the backends must agree on any grid, 3 x 5 included,
# and only the resolution-free model runs on a grid other than its sample_size's.
TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, patch_size=2,
            num_embeds_ada_norm=10, gate_rank=4, lpe_kernel_size=3, class_dropout_prob=0.0, use_abs_pos_embed=False)
MODES = ("none", "fixed", "1d", "bidirectional", "decomposed", "cdsf")


def reference_and_fast(backend: str, dtype: torch.dtype = torch.float64, **overrides):
    """A model on the plain reference path with the ``math`` backend and a copy on the fast path with ``backend``;
    adaLN-Zero, the final layer and W_g randomised so that every parameter gets a gradient."""
    config = {**TINY, **overrides}
    torch.manual_seed(0)
    ref = SDTTransformer2DModel(**config, attention_backend="math").to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name or "attn.gate." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    use_reference_path(ref)
    fast = SDTTransformer2DModel(**config, attention_backend=backend).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def inputs(batch: int, height: int, width: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, height, width, generator=g, dtype=dtype)
    return x, torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 10, (batch,), generator=g)


def assert_same_outputs_and_gradients(ref, fast, x, t, y, rtol=1e-10, atol=1e-12):
    (out_ref, grads_ref), (out, grads) = (forward_backward(m, x, t, y) for m in (ref, fast))
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    for name, g in grads_ref.items():
        assert g is not None and grads[name] is not None, name
        torch.testing.assert_close(grads[name], g, rtol=100 * rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- kernels
def test_rope_qk_equals_the_plain_rotation_and_its_gradient():
    angles = eq.rope_2d_angles(3, 5, 16)
    cos, sin = eq.rope_tables(angles)
    base = torch.randn(2, 15, 5, 16, dtype=torch.float64)
    x = base[..., :2, :].requires_grad_()  # strided, like the Q/K columns of the projection output
    x_ref = x.detach().clone().requires_grad_()
    out = kernels.rope_qk(x, cos[:, None], sin[:, None])
    ref = eq.apply_rope(x_ref, angles.cos()[:, None].double(), angles.sin()[:, None].double())
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    weight = torch.randn_like(ref)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-14, atol=1e-14)


def test_rope_qk_keeps_the_input_dtype_and_rotates_in_float32():
    angles = eq.rope_2d_angles(4, 4, 8)
    x = torch.randn(2, 16, 3, 8)
    out = kernels.rope_qk(x.bfloat16(), *eq.rope_tables(angles[:, None]))
    assert out.dtype == torch.bfloat16
    expected = eq.apply_rope_tables(x.bfloat16(), *eq.rope_tables(angles[:, None]))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even width"):
        kernels.rope_qk(torch.randn(2, 3, 5), torch.ones(5), torch.ones(5))


@pytest.mark.parametrize("height, width, kernel", [(4, 4, 3), (3, 5, 5), (1, 6, 3)])
def test_depthwise_conv_tokens_equals_conv2d_with_all_gradients(height, width, kernel):
    channels = 6
    x = torch.randn(2, height * width, channels, dtype=torch.float64, requires_grad=True)
    conv = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels).double()
    out = kernels.depthwise_conv_tokens(x, conv.weight, conv.bias, height, width)
    grid = x.reshape(2, height, width, channels).permute(0, 3, 1, 2)
    ref = conv(grid).permute(0, 2, 3, 1).reshape(2, height * width, channels)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weight).sum(), (x, conv.weight, conv.bias))
    grads_ref = torch.autograd.grad((ref * weight).sum(), (x, conv.weight, conv.bias))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_depthwise_conv_tokens_gradcheck_and_bad_kernel():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: kernels.depthwise_conv_tokens(x, w, b, 2, 3), (x, w, b))
    with pytest.raises(ValueError, match="depthwise kernel"):
        kernels.depthwise_conv_tokens(x, torch.randn(3, 1, 2, 2, dtype=torch.float64), None, 2, 3)


# ---------------------------------------------------------------------------------------------- the module
def test_fused_input_projection_equals_the_separate_layers():
    torch.manual_seed(0)
    attn = SpatialDecayAttention(16, 2, gate_rank=4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    qk, v, gate_logits, u = attn._input_projections(x)
    qkv = attn.qkv(x)
    torch.testing.assert_close(torch.cat([qk, v], -1), qkv, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gate_logits, attn.gate(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(u, attn.gate_down(x), rtol=1e-14, atol=1e-14)
    assert SpatialDecayAttention(16, 2, decay_mode="none")._input_projections(x.float())[2] is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["auto", "augmented", "sdpa"])
def test_fast_path_equals_reference_path_every_gradient(mode, backend):
    """Fast module path (+ backend) against the plain path with ``math``, on a non-square 3 x 5 token grid."""
    ref, fast = reference_and_fast(backend, decay_mode=mode)
    assert_same_outputs_and_gradients(ref, fast, *inputs(2, 6, 10))


def test_fast_path_with_gradient_checkpointing_and_head_width_72():
    ref, fast = reference_and_fast("auto", num_layers=1, attention_head_dim=72)
    fast.enable_gradient_checkpointing()
    fast.train()
    assert_same_outputs_and_gradients(ref, fast, *inputs(2, 8, 6))


def test_use_reference_path_switches_every_attention_layer():
    model = SDTTransformer2DModel(**TINY)
    layers = [m for m in model.modules() if isinstance(m, SpatialDecayAttention)]
    assert len(layers) == TINY["num_layers"] and not any(m.reference_path for m in layers)
    use_reference_path(model)
    assert all(m.reference_path for m in layers)
    use_reference_path(model, False)
    assert not any(m.reference_path for m in layers)


def test_layerwise_casting_takes_the_per_layer_projections():
    """With weights stored in bf16 and cast by diffusers' hooks, the fast path calls the layers one by one
    (a concatenated bf16 weight would meet float32 activations) and equals the reference path."""
    ref, fast = reference_and_fast("auto", dtype=torch.float32)
    for model in (ref, fast):
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert fast.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert fast.blocks[0].attn.gate.weight.dtype == torch.float32  # kept: precision-critical
    x, t, y = inputs(2, 8, 8, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, y).sample, ref(x, t, y).sample, rtol=1e-4, atol=1e-5)


def test_fast_path_keeps_fewer_bytes_for_backward_than_the_reference():
    """Activation memory: the fast path (auto -> dense on CPU) saves less for backward than the plain path with
    the backend `auto` chose before (augmented: Q, K, V at width d + 1 + 2T, padded)."""
    config = dict(TINY, attention_head_dim=16, sample_size=16)

    def saved_bytes(model) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        x, t, y = inputs(2, 16, 16, torch.float32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, t, y)
        return sum(seen.values())

    torch.manual_seed(0)
    before = SDTTransformer2DModel(**config, attention_backend="augmented")
    use_reference_path(before)
    after = SDTTransformer2DModel(**config)
    after.load_state_dict(before.state_dict())
    assert saved_bytes(after) < 0.9 * saved_bytes(before)


def test_fast_path_keeps_no_view_of_the_projection_output_alive():
    """Nothing saved for backward may share storage with the fused projection's (B, L, 3D + N + r) output
    (a saved view of it, e.g. the gate logits for log sigma, would keep all of it alive)."""
    torch.manual_seed(0)
    attn = SpatialDecayAttention(16, 2, gate_rank=4)
    b, height, width = 2, 3, 4
    x = torch.randn(b, height * width, 16, requires_grad=True)
    projection_bytes = b * height * width * (3 * 16 + 2 + 4) * x.element_size()
    storages: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.append(t.untyped_storage().nbytes())
        return t

    context = GridContext.build(height, width, head_dim=8, decay_mode=attn.decay_mode, backend="dense")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attn(x, context)
    assert storages and projection_bytes not in storages


def test_residual_stream_is_contiguous():
    """The blocks see a contiguous (B, L, D) stream (a transposed one makes every LayerNorm copy its input)."""
    model = SDTTransformer2DModel(**TINY)
    seen: list[bool] = []
    for block in model.blocks:
        block.norm1.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    model(*inputs(2, 8, 8, torch.float32))
    assert seen == [True] * TINY["num_layers"]


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend, compiler", [("auto", "inductor"), ("augmented", "aot_eager")])
def test_compiled_model_fullgraph_forward_backward_exact(backend, compiler):
    """No graph break in forward or backward (``fullgraph=True``), and float64 exactness against the
    plain path with the ``math`` backend.  ``auto`` is ``dense`` here (CPU, 12 tokens).  Timestep 0: diffusers'
    timestep embedding takes sin/cos in float32, where compiled and eager kernels may differ in the last bit."""
    torch._dynamo.reset()
    ref, fast = reference_and_fast(backend)
    compiled = torch.compile(fast, fullgraph=True, backend=compiler)
    x, _, y = inputs(2, 6, 8)
    t = torch.zeros(2, dtype=torch.long)
    out = compiled(x, t, y).sample
    out.square().mean().backward()
    out_ref, grads_ref = forward_backward(ref, x, t, y)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name], rtol=1e-8, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
