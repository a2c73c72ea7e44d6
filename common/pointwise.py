"""1x1 ("pointwise") convolutions as plain matrix products on the small maps at the top of the network.

Why this exists: a 1x1 stride-1 convolution over a channels-last map *is* a matrix product.
The map's memory is already the (N*H*W, C_in) matrix of its pixels, so `F.linear` on a
permuted view computes the same numbers with no copy, and its output, permuted back, is
again a channels-last map. On CPU, oneDNN's convolution kernels carry a fixed cost per call
that dominates on small maps: at 96 px the trainable blocks of the default freeze point work
on 3x3 maps (N*H*W = 288 rows for a batch of 32), where forward + backward of one 1x1 layer
took 1.3-1.8x longer as a convolution than as `F.linear` (MKL's GEMM; measured, batch 32, one
and two threads). Whole cached training step, two threads: 39 -> 31.5 ms at the default
freeze point, 69 -> 60 ms at freeze-blocks 12; uncached and full fine-tuning steps unchanged
within noise. On large maps the two are even, or the convolution wins (112x112, 96 -> 16
channels: 0.8x), so the product is used only up to `LINEAR_MAX_MAP`.

The result equals `F.conv2d`'s up to float summation order (relative 1e-6); the layer's
weight keeps its (C_out, C_in, 1, 1) shape, so state dicts are unchanged.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Largest input map (each side) on which a 1x1 convolution runs as a matrix product.
LINEAR_MAX_MAP = 16


def uses_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `pointwise_conv2d(x, weight)` runs as a matrix product.

    Needs an ungrouped 1x1 weight and a channels-last CPU map no larger than
    `LINEAR_MAX_MAP` on each side: only then is the permuted view a matrix with no copy,
    and only there was it measured faster.
    """
    return (x.device.type == "cpu" and x.dim() == 4 and weight.shape[1:] == (x.shape[1], 1, 1)
            and max(x.shape[-2:]) <= LINEAR_MAX_MAP and x.is_contiguous(memory_format=torch.channels_last))


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias)` (stride 1, no padding) for a 1x1 weight, as a matrix product where faster."""
    if uses_linear(x, weight):
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias)
