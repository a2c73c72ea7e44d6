"""A 1x1 convolution run as a matrix product is the same convolution: same values, same gradients, same layout."""

import pytest
import torch
from torch.nn import functional as F

from fedrad.common import efficientnet_lite
from fedrad.common.efficientnet_lite import efficientnet_lite0
from fedrad.common.pointwise import LINEAR_MAX_MAP, pointwise_conv2d, uses_linear


def _case(size: int, c_in: int = 24, c_out: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, c_in, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, torch.randn(c_out, c_in, 1, 1, generator=gen), torch.randn(c_out, generator=gen)


@pytest.mark.parametrize("size", [1, 3, 6, LINEAR_MAX_MAP])
def test_matrix_product_equals_conv2d_with_gradients(size):
    x, weight, bias = _case(size)
    assert uses_linear(x, weight)
    leaves = [[t.clone().requires_grad_() for t in (x, weight, bias)] for _ in range(2)]
    plain = F.conv2d(*leaves[0])
    fast = pointwise_conv2d(*leaves[1])
    assert fast.shape == plain.shape and fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(plain)
    plain.backward(grad_out)
    fast.backward(grad_out)
    for a, b in zip(leaves[0], leaves[1]):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-4)
    assert leaves[1][0].grad.is_contiguous(memory_format=torch.channels_last)


def test_the_matrix_product_is_used_only_where_it_was_measured_faster():
    x, weight, _ = _case(3)
    assert uses_linear(x, weight)
    assert not uses_linear(x.contiguous(), weight)  # NCHW: the permuted view is no matrix
    big, big_w, _ = _case(LINEAR_MAX_MAP + 1)
    assert not uses_linear(big, big_w)
    assert not uses_linear(x, torch.randn(40, 24, 3, 3))  # not a 1x1 kernel
    assert not uses_linear(x, torch.randn(24, 1, 1, 1))  # grouped
    # where not used, the very same F.conv2d call runs
    assert torch.equal(pointwise_conv2d(big, big_w), F.conv2d(big, big_w))


def test_the_model_runs_its_small_1x1_layers_as_matrix_products(monkeypatch):
    """Same logits and gradients as with every 1x1 layer a convolution; and the product really ran.

    Pretrained weights: with random ones the activations vanish through the blocks and
    training-mode BN blows float rounding up to O(1) differences between any two kernels.
    """
    calls = []
    real = efficientnet_lite.pointwise_conv2d

    def counting(x, weight, bias=None):
        calls.append(uses_linear(x, weight))
        return real(x, weight, bias)

    x = torch.rand(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    grads = []
    for route in (True, False):
        monkeypatch.setattr(efficientnet_lite, "pointwise_conv2d", counting if route else F.conv2d)
        model = efficientnet_lite0(pretrained=True, num_classes=2, seed=0).to(memory_format=torch.channels_last)
        model.train()
        torch.manual_seed(0)  # the same dropout mask
        logits = model(x)
        logits.sum().backward()
        grads.append((logits.detach(), model._conv_head.weight.grad, model._blocks[15]._expand_conv.weight.grad))
    assert any(calls) and not all(calls)  # small maps as products, the large early ones as convolutions
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
