"""Depthwise convolution whose weight gradient is fast on the small maps at the top of the network.

Why this exists: on CPU, oneDNN's weight-gradient kernel for a 5x5 depthwise convolution is
pathologically slow on small feature maps. At 96 px the trainable blocks of the default
freeze point work on 3x3 maps, where that one kernel took 15 ms of a 55 ms cached training
step (batch 32, one thread: 8 M multiply-adds, a 3x3 kernel of the same size takes 0.4 ms).
Its 3x3 kernel is fast, so a 5x5 weight gradient is computed here as four 3x3 ones over
shifted crops of the padded input (tap offsets 0-2 and 2-4 in each direction; the overlap
is written twice with the same values): 3 ms instead of 15.

Only the backward pass changes, and only the weight gradient: the forward pass and the
input gradient are the very same oneDNN calls as `F.conv2d`'s, and the weight gradient
agrees with oneDNN's to float rounding (relative 1e-6). On larger maps the split is not
faster (measured: 1.4-4.7x faster up to 12x12 outputs, even at 14x14, slower at 24x24), on
GPUs cuDNN is fine, and without a weight gradient there is nothing to split, so all of
those take the plain path.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Largest output map (each side) for which the split weight gradient is used.
SMALL_MAP = 8
_SUB = 3  # the sub-kernel oneDNN computes fast


def uses_split(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether `depthwise_conv2d` takes the split weight-gradient path for these arguments."""
    kernel = weight.shape[-2:]
    if x.device.type != "cpu" or not weight.requires_grad or tuple(kernel) != (5, 5):
        return False
    out = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[-2:], padding, kernel, stride)]
    return max(out) <= SMALL_MAP


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                     padding: tuple[int, int]) -> torch.Tensor:
    """`F.conv2d(x, weight, None, stride, padding, groups=channels)`, with the fast weight gradient where it helps."""
    if uses_split(x, weight, stride, padding) and torch.is_grad_enabled():
        return _SplitGradDepthwise.apply(x, weight, stride, padding)
    return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])


def split_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                      padding: tuple[int, int]) -> torch.Tensor:
    """Weight gradient of a KxK depthwise convolution as 3x3 ones over shifted crops of the padded input.

    The input is padded once and the crops are views of it (oneDNN copies each view; four
    separately padded crops measured the same in a training step). What remains of the
    split's cost is this memory traffic: ~4 ms per 5x5 layer at batch 32, most of it the
    zero fill of the padded copy.
    """
    channels, _, kh, kw = weight.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    e_h, e_w = (s * (o - 1) + _SUB for s, o in zip(stride, grad_out.shape[-2:]))  # crop size
    sub = torch.empty((channels, 1, _SUB, _SUB), dtype=weight.dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.empty_like(weight)
    for a in sorted({0, kh - _SUB}):
        for b in sorted({0, kw - _SUB}):
            grad[:, :, a:a + _SUB, b:b + _SUB] = torch.ops.aten.convolution_backward(
                grad_out, xp[:, :, a:a + e_h, b:b + e_w], sub, None, list(stride), [0, 0], [1, 1], False, [0, 0],
                channels, [False, True, False])[1]
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
