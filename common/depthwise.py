"""Depthwise convolution whose weight gradient is fast on the small maps at the top of the network.

Why this exists: on CPU, oneDNN's weight-gradient kernel for a 5x5 depthwise convolution is
pathologically slow on small feature maps. At 96 px the trainable blocks of the default
freeze point work on 3x3 maps, where that one kernel took 15 ms of a 55 ms cached training
step (batch 32, one thread: 8 M multiply-adds; a 3x3 kernel of the same size takes 0.2-0.4
ms). So the 5x5 weight gradient is computed here in two parts (`split_weight_grad`): the
inner 3x3 taps by oneDNN's fast 3x3 kernel, the outer ring tap by tap: 1.1 ms instead of 11
at a 3x3 map.

Only the backward pass changes, and only the weight gradient: the forward pass and the
input gradient are the very same oneDNN calls as `F.conv2d`'s, and the weight gradient
agrees with oneDNN's to float rounding (relative 1e-6). The split is used where it was
measured faster: 5x5 kernels with "same" symmetric padding, output maps up to `SMALL_MAP`
(one thread, batch 32: 10x faster at 3x3, 1.9x at 6x6, 1.3x at 8x8, even at 10x10, slower
from 12x12 on), on CPU (cuDNN is fine), and only when the weight is trained.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Largest output map (each side) for which the split weight gradient is used.
SMALL_MAP = 8


def uses_split(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether `depthwise_conv2d` takes the split weight-gradient path for these arguments."""
    kernel = weight.shape[-2:]
    if x.device.type != "cpu" or not weight.requires_grad or tuple(kernel) != (5, 5) or min(padding) < 1:
        return False
    out = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[-2:], padding, kernel, stride)]
    return max(out) <= SMALL_MAP


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                     padding: tuple[int, int]) -> torch.Tensor:
    """`F.conv2d(x, weight, None, stride, padding, groups=channels)`, with the fast weight gradient where it helps."""
    if uses_split(x, weight, stride, padding) and torch.is_grad_enabled():
        return _SplitGradDepthwise.apply(x, weight, stride, padding)
    return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])


def _valid(out: int, size: int, tap: int, pad: int, stride: int) -> tuple[int, int]:
    """Output positions [lo, hi) at which kernel tap `tap` reads inside the (unpadded) input."""
    lo = max(0, -((tap - pad) // stride))  # ceil((pad - tap) / stride)
    hi = min(out, (size - 1 + pad - tap) // stride + 1)
    return lo, max(lo, hi)


def split_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                      padding: tuple[int, int]) -> torch.Tensor:
    """Weight gradient of a 5x5 depthwise convolution: its inner 3x3 taps by oneDNN, the outer ring tap by tap.

    The inner taps are a 3x3 weight gradient with one pixel less padding (oneDNN's fast
    kernel, no copy). Each of the 16 outer taps is a sum of products over the output
    positions where it reads real pixels (on a 3x3 map, one to three of them): no padded
    copy of the input is ever made, which was most of the cost of splitting into four
    3x3 gradients over padded crops (measured 7.5-9.9 ms per layer at batch 32, of which
    the oneDNN kernels ~2 ms).
    """
    channels, _, kh, kw = weight.shape
    if (kh, kw) != (5, 5) or min(padding) < 1:
        raise ValueError(f"split_weight_grad handles 5x5 kernels with padding >= 1; got {(kh, kw)}, {padding}.")
    (ph, pw), (sh, sw) = padding, stride
    (oh, ow), (n_h, n_w) = grad_out.shape[-2:], x.shape[-2:]
    grad = torch.empty_like(weight)
    sub = torch.empty((channels, 1, 3, 3), dtype=weight.dtype).contiguous(memory_format=torch.channels_last)
    grad[:, :, 1:kh - 1, 1:kw - 1] = torch.ops.aten.convolution_backward(
        grad_out, x, sub, None, [sh, sw], [ph - 1, pw - 1], [1, 1], False, [0, 0], channels, [False, True, False])[1]
    for i in range(kh):
        rows = _valid(oh, n_h, i, ph, sh)
        for j in range(kw):
            if 0 < i < kh - 1 and 0 < j < kw - 1:
                continue
            cols = _valid(ow, n_w, j, pw, sw)
            if rows[0] == rows[1] or cols[0] == cols[1]:
                grad[:, 0, i, j] = 0.0
                continue
            g = grad_out[:, :, rows[0]:rows[1], cols[0]:cols[1]]
            xs = x[:, :, rows[0] * sh + i - ph:(rows[1] - 1) * sh + i - ph + 1:sh,
                   cols[0] * sw + j - pw:(cols[1] - 1) * sw + j - pw + 1:sw]
            grad[:, 0, i, j] = (g * xs).sum((0, 2, 3))
    return grad


class _SplitGradDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding):  # noqa: ANN001, ANN205 - autograd's signature
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0],
                weight.shape[0], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = split_weight_grad(grad_out, x, weight, ctx.stride, ctx.padding)
        return grad_x, grad_w, None, None
