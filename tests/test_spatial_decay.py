"""Each decay variant against a direct, loop-level transcription of its equation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdt_diffusion import spatial_decay_bias
from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.backends import DecayInputs, math_attention, sdpa_attention

B, H, W, N = 2, 3, 4, 2
L = H * W


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def pos(i: int) -> tuple[int, int]:
    return divmod(i, W)


def test_manhattan_distance_eq7():
    d = eq.manhattan_distance(H, W)
    for i in range(L):
        for j in range(L):
            (hi, wi), (hj, wj) = pos(i), pos(j)
            assert d[i, j] == abs(hi - hj) + abs(wi - wj)


@pytest.mark.parametrize("alpha", [0.1, 0.37])
def test_spatial_decay_bias_eq8_9_elementwise(alpha):
    gates = F.logsigmoid(torch.randn(B, H, W, N, dtype=torch.float64))
    m = spatial_decay_bias(gates, alpha)
    assert m.shape == (B, N, L, L)
    for b in range(B):
        for n in range(N):
            for i in range(L):
                for j in range(L):
                    (hi, wi), (hj, wj) = pos(i), pos(j)
                    combined = 0.5 * (gates[b, hi, wi, n] + gates[b, hj, wj, n]) * (abs(hi - hj) + abs(wi - wj)) * alpha
                    assert torch.isclose(m[b, n, i, j], -abs(combined), atol=1e-12)


def test_spatial_decay_bias_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, H, W, N\)"):
        spatial_decay_bias(torch.zeros(2, 16, 3), 0.1)


def test_fixed_decay_rmt():
    log_gamma = eq.rmt_log_gamma(N, 2.0, 4.0)
    for h in range(N):
        assert math.isclose(log_gamma[h].item(), math.log(1 - 2 ** (-2.0 - 4.0 * h / N)), rel_tol=1e-6)
    m = eq.fixed_decay_bias(log_gamma.double(), H, W)
    for n in range(N):
        for i in range(L):
            for j in range(L):
                (hi, wi), (hj, wj) = pos(i), pos(j)
                assert torch.isclose(m[n, i, j], (abs(hi - hj) + abs(wi - wj)) * log_gamma[n].double(), atol=1e-6)


def test_raster_1d_decay_eq6_symmetric():
    g = F.logsigmoid(torch.randn(B, L, N))
    m = eq.raster_decay_bias(g)
    for b in range(B):
        for n in range(N):
            for i in range(L):
                for j in range(L):
                    expected = sum(g[b, k, n] for k in range(min(i, j), max(i, j)))
                    assert torch.isclose(m[b, n, i, j], torch.as_tensor(expected, dtype=m.dtype), atol=1e-6)


def test_bidirectional_decay():
    g = F.logsigmoid(torch.randn(B, L, N))
    m = eq.bidirectional_decay_bias(g)
    for b in range(B):
        for n in range(N):
            for i in range(L):
                for j in range(L):
                    lo, hi = min(i, j), max(i, j)
                    fwd = sum(g[b, k, n] for k in range(lo, hi))
                    bwd = sum(g[b, k, n] for k in range(lo + 1, hi + 1))
                    assert torch.isclose(m[b, n, i, j], torch.as_tensor(0.5 * (fwd + bwd), dtype=m.dtype), atol=1e-6)


def test_decomposed_attention_eq11_12_loops():
    d = 3
    q, k, v = (torch.randn(B, N, L, d) for _ in range(3))
    f_h, f_w = torch.randn(B, L, N), torch.randn(B, L, N)
    out = eq.decomposed_attention(q, k, v, f_h, f_w, H, W)

    def decay(f, b, n, cells):  # eq. 11 over the ordered cells of one row or column
        size = len(cells)
        m = torch.zeros(size, size)
        for a in range(size):
            for c in range(size):
                m[a, c] = -sum(abs(F.logsigmoid(f[b, cells[t], n])) for t in range(min(a, c), max(a, c)))
        return m

    expected = torch.zeros_like(v)
    for b in range(B):
        for n in range(N):
            mid = torch.zeros(L, d)
            for r in range(H):  # Attn_W within each row
                cells = [r * W + c for c in range(W)]
                s = q[b, n, cells] @ k[b, n, cells].T / math.sqrt(d) + decay(f_w, b, n, cells)
                mid[cells] = s.softmax(-1) @ v[b, n, cells]
            for c in range(W):  # Attn_H within each column, applied to Attn_W V
                cells = [r * W + c for r in range(H)]
                s = q[b, n, cells] @ k[b, n, cells].T / math.sqrt(d) + decay(f_h, b, n, cells)
                expected[b, n, cells] = s.softmax(-1) @ mid[cells]
    torch.testing.assert_close(out, expected)


def test_fixed_decomposed_attention_rmt_loops():
    """RMT's decomposed decay (``VisionRetentionChunk``): along W with gamma_h^|dw|, then along H with gamma_h^|dh|
    on the first pass's output; a float64 loop transcription."""
    d = 3
    q, k, v = (torch.randn(B, N, L, d) for _ in range(3))
    log_gamma = eq.rmt_log_gamma(N, 2.0, 4.0).double()
    out = eq.fixed_decomposed_attention(q, k, v, log_gamma, H, W)
    expected = torch.zeros_like(v)
    for b in range(B):
        for n in range(N):
            gamma = math.exp(log_gamma[n].item())
            mid = torch.zeros(L, d)
            for r in range(H):  # along W within each row
                for c in range(W):
                    i = r * W + c
                    w = torch.tensor([math.exp(q[b, n, i] @ k[b, n, r * W + c2] / math.sqrt(d)) * gamma ** abs(c - c2)
                                      for c2 in range(W)])
                    mid[i] = sum(w[c2] * v[b, n, r * W + c2] for c2 in range(W)) / w.sum()
            for c in range(W):  # along H within each column, on the row pass's output
                for r in range(H):
                    i = r * W + c
                    w = torch.tensor([math.exp(q[b, n, i] @ k[b, n, r2 * W + c] / math.sqrt(d)) * gamma ** abs(r - r2)
                                      for r2 in range(H)])
                    expected[b, n, i] = sum(w[r2] * mid[r2 * W + c] for r2 in range(H)) / w.sum()
    torch.testing.assert_close(out, expected)
    # the two 1D masks are RMT's generate_1d_decay: |a - b| log gamma_h
    m = eq.fixed_axial_decay_bias(log_gamma, W)
    assert m.shape == (N, W, W)
    for n in range(N):
        for a in range(W):
            for c in range(W):
                assert m[n, a, c].item() == pytest.approx(abs(a - c) * log_gamma[n].item())


def test_attention_with_bias_eq10():
    q, k, v = (torch.randn(B, N, L, 4) for _ in range(3))
    bias = -torch.rand(B, N, L, L)
    out = eq.attention_with_bias(q, k, v, bias)
    for b in range(B):
        for n in range(N):
            s = torch.tensor([[sum(q[b, n, i, c] * k[b, n, j, c] for c in range(4)) / 2.0 for j in range(L)] for i in range(L)])
            p = torch.exp(s + bias[b, n]) / torch.exp(s + bias[b, n]).sum(-1, keepdim=True)
            torch.testing.assert_close(out[b, n], p @ v[b, n])


def test_rope_2d_axial_halves():
    d = 8
    angles = eq.rope_2d_angles(H, W, d)
    assert angles.shape == (L, d // 2)
    for i in range(L):
        h, w = pos(i)
        for kk in range(d // 4):
            theta = 10000.0 ** (-kk / (d // 4))
            assert math.isclose(angles[i, kk].item(), h * theta, rel_tol=1e-6, abs_tol=1e-7)
            assert math.isclose(angles[i, d // 4 + kk].item(), w * theta, rel_tol=1e-6, abs_tol=1e-7)
    # relative: <R(q)_i, R(k)_j> depends only on the offset between positions i and j
    q, k = torch.randn(d), torch.randn(d)
    cos, sin = angles.cos().double(), angles.sin().double()
    rq = eq.apply_rope(q.expand(L, d), cos, sin)
    rk = eq.apply_rope(k.expand(L, d), cos, sin)
    s = rq @ rk.T
    # tokens (0,0)->(1,1) and (1,2)->(2,3) share the same offset
    assert torch.isclose(s[0 * W + 0, 1 * W + 1], s[1 * W + 2, 2 * W + 3])
    with pytest.raises(ValueError, match="divisible by 4"):
        eq.rope_2d_angles(H, W, 6)


def test_rope_1d_is_rmts_raster_rope():
    """RMT's RetNetRelPos2d: angle_k = 1 / 10000^linspace(0, 1, d/2)[k] at the raster index l = h * W + w, rotating
    the interleaved pairs (2k, 2k + 1) (theta_shift); ours rotates (k, k + d/2) by the same angle, so it equals RMT's
    after the fixed channel permutation that interleaves the two halves."""
    d = 8
    angles = eq.rope_1d_angles(H, W, d)
    assert angles.shape == (L, d // 2)
    for i in range(L):
        for kk in range(d // 2):
            theta = 1.0 / 10000.0 ** (kk / (d // 2 - 1))
            assert math.isclose(angles[i, kk].item(), i * theta, rel_tol=1e-6, abs_tol=1e-7)
    x = torch.randn(L, d)
    ours = eq.apply_rope(x, angles.cos().double(), angles.sin().double())
    perm = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()  # [0, 4, 1, 5, ...]
    xi = x[:, perm]  # RMT's channel order: pair k is (2k, 2k + 1)
    angle_rmt = angles.double().repeat_interleave(2, dim=-1)  # RMT's angle buffer, each slot twice
    rotated = torch.stack([-xi[:, 1::2], xi[:, ::2]], dim=-1).flatten(-2)  # RMT's rotate_every_two
    rmt = xi * angle_rmt.cos() + rotated * angle_rmt.sin()  # RMT's theta_shift
    torch.testing.assert_close(ours[:, perm], rmt)
    assert torch.equal(eq.rope_angles("1d", H, W, d), angles) and torch.equal(eq.rope_angles("2d", H, W, d),
                                                                              eq.rope_2d_angles(H, W, d))
    with pytest.raises(ValueError, match="even head width"):
        eq.rope_1d_angles(H, W, 5)
    with pytest.raises(ValueError, match="rope_layout must be one of"):
        eq.rope_angles("3d", H, W, d)


@pytest.mark.parametrize("mode", ["none", "fixed", "1d", "bidirectional", "decomposed", "fixed_decomposed", "cdsf"])
def test_sdpa_equals_math_functional(mode):
    q, k, v = (torch.randn(B, N, L, 4, requires_grad=True) for _ in range(3))
    gl = torch.randn(B, L, 2 * N, requires_grad=True)

    def decay():
        return DecayInputs(mode, H, W, 0.1, gates=F.logsigmoid(gl[..., :N]), gate_logits_h=gl[..., :N],
                           gate_logits_w=gl[..., N:], log_gamma=eq.rmt_log_gamma(N).double())

    a = math_attention(q, k, v, decay())
    grads_a = torch.autograd.grad(a.square().sum(), (q, k, v, gl), allow_unused=True)
    b = sdpa_attention(q, k, v, decay())
    grads_b = torch.autograd.grad(b.square().sum(), (q, k, v, gl), allow_unused=True)
    torch.testing.assert_close(a, b)
    for ga, gb in zip(grads_a, grads_b):
        if ga is None:
            assert gb is None
        else:
            torch.testing.assert_close(ga, gb)
