"""Fast forms of the non-attention pieces of Spatial Decay Attention: RoPE on Q and K, and LPE's convolution.

Each function computes exactly what its counterpart in :mod:`~sdt_diffusion.attention.spatial_decay` computes
(the tests compare them in float64, outputs and gradients); they differ only in how many passes over memory
they make and what they keep for the backward pass.

* :func:`rope_qk` -- R(x) (eq. 13) as one autograd node: the product with ``[cos, cos]`` and two half-width
  multiply-adds, written in place into one output (forward and backward alike), instead of a half swap, two
  products and a sum.  Nothing but the tables is kept for the backward pass.
* :func:`depthwise_conv_tokens` -- LPE's depthwise convolution on token-major input (B, L, C) in
  channels-last layout.  On CPU its backward is written out: the input gradient is a convolution with the
  flipped kernel and the weight gradient one grouped convolution of the input with the output gradient
  (batch folded into the groups); PyTorch's own depthwise weight gradient on CPU is more than ten times
  slower than its forward.  Other devices use ``torch.nn.functional.conv2d`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _RotaryQK(torch.autograd.Function):
    """``x * [cos, cos] + [x2, x1] * [-sin, sin]`` (RoPE, eq. 13) with the half swap folded into two
    in-place multiply-adds; the backward is the transposed rotation."""

    @staticmethod
    def forward(ctx, x: Tensor, cos_full: Tensor, sin_signed: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        xc = x.to(_compute_dtype(x.dtype))
        out = xc * cos_full
        out[..., :half].addcmul_(xc[..., half:], sin_signed[..., :half])  # x1 cos - x2 sin
        out[..., half:].addcmul_(xc[..., :half], sin_signed[..., half:])  # x2 cos + x1 sin
        ctx.save_for_backward(cos_full, sin_signed)
        ctx.input_dtype = x.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos_full, sin_signed = ctx.saved_tensors
        half = grad.shape[-1] // 2
        gc = grad.to(_compute_dtype(grad.dtype))
        dx = gc * cos_full
        dx[..., :half].addcmul_(gc[..., half:], sin_signed[..., half:])  # d x1 = g1 cos + g2 sin
        dx[..., half:].addcmul_(gc[..., :half], sin_signed[..., :half])  # d x2 = g2 cos - g1 sin
        return dx.to(ctx.input_dtype), None, None


def rope_qk(x: Tensor, cos_full: Tensor, sin_signed: Tensor) -> Tensor:
    """R(x) of ``spatial_decay.apply_rope_tables`` in one pass per half (and one node for autograd).

    x: (..., d), any strides (e.g. the Q/K columns of a projection's output); tables from
    ``spatial_decay.rope_tables``, broadcastable to x.  Computed in float32 (or wider) and returned in x's dtype.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even width, got {x.shape[-1]}")
    cos_full, sin_signed = (t.to(_compute_dtype(x.dtype)) for t in (cos_full, sin_signed))
    return _RotaryQK.apply(x, cos_full, sin_signed)


class _DepthwiseConvCPU(torch.autograd.Function):
    """Depthwise 'same' convolution (stride 1, odd kernel) with the backward written as two convolutions."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        pad = weight.shape[-1] // 2
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        k = weight.shape[-1]
        pad = k // 2
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the adjoint of a stride-1 'same' correlation: the flipped kernel
            grad_x = F.conv2d(grad, weight.flip(-1, -2), None, padding=pad, groups=c)
        if ctx.needs_input_grad[1]:
            # dW[c, u, v] = sum_{b, i, j} x_pad[b, c, i + u, j + v] g[b, c, i, j]: a correlation of each
            # (sample, channel) plane of the padded input with the same plane of g, i.e. one grouped convolution
            # with B * C groups whose kernels are the planes of g; the B results are summed.
            planes = F.pad(x.contiguous(), (pad, pad, pad, pad)).reshape(1, b * c, h + 2 * pad, w + 2 * pad)
            kernels = grad.contiguous().reshape(b * c, 1, h, w)
            grad_w = F.conv2d(planes, kernels, groups=b * c).reshape(b, c, 1, k, k).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def depthwise_conv_tokens(x: Tensor, weight: Tensor, bias: Tensor | None, height: int, width: int) -> Tensor:
    """Depthwise 'same' convolution (kernel ``weight`` (C, 1, k, k), k odd, stride 1) of token-major x (B, L, C).

    The grid is x's own (token, channel) order, i.e. channels-last: no transposes.  Returns (B, L, C).  On CPU
    with gradients the backward is :class:`_DepthwiseConvCPU`'s; elsewhere ``F.conv2d`` (cuDNN on CUDA).
    """
    b, seq, channels = x.shape
    k = weight.shape[-1]
    if weight.shape != (channels, 1, k, k) or k % 2 == 0:
        raise ValueError(f"expected a depthwise kernel (C, 1, k, k) with k odd for C={channels}, got {tuple(weight.shape)}")
    grid = x.reshape(b, height, width, channels).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu" and torch.is_grad_enabled():
        out = _DepthwiseConvCPU.apply(grid, weight, bias)
    else:
        out = F.conv2d(grid, weight, bias, padding=k // 2, groups=channels)
    return out.permute(0, 2, 3, 1).reshape(b, seq, channels)


__all__ = ["depthwise_conv_tokens", "rope_qk"]
