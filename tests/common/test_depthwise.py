"""The split weight gradient of a depthwise convolution is the same gradient, only computed faster."""

import pytest
import torch
from torch.nn import functional as F

from fedrad.common.depthwise import SMALL_MAP, depthwise_conv2d, split_weight_grad, uses_split
from fedrad.common.efficientnet_lite import SameConv2d, efficientnet_lite0, same_pad


def _case(size: int, stride: int, channels: int = 24, kernel: int = 5, seed: int = 0):
    """A channels-last input as `SameConv2d` passes it on: pre-padded when TF pads asymmetrically."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, kernel, kernel, generator=gen)
    x, padding = same_pad(x, (kernel, kernel), (stride, stride))
    return x, weight, padding


@pytest.mark.parametrize(("size", "stride"), [(3, 1), (4, 1), (6, 1), (7, 1), (8, 1), (3, 2), (7, 2), (13, 2)])
def test_split_weight_gradient_equals_autograd_through_conv2d(size, stride):
    x, weight, padding = _case(size, stride)
    assert padding == (2, 2)  # the symmetric "same" padding the split handles
    plain_x, plain_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = F.conv2d(plain_x, plain_w, None, stride, padding, 1, weight.shape[0])
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    split = split_weight_grad(grad_out, x, weight, (stride, stride), padding)
    torch.testing.assert_close(split, plain_w.grad, rtol=1e-5, atol=1e-5)


def test_the_split_path_changes_neither_the_forward_pass_nor_the_input_gradient():
    x, weight, padding = _case(3, 1)
    assert uses_split(x, weight.requires_grad_(), (1, 1), padding)
    plain_x, plain_w = x.clone().requires_grad_(), weight.detach().clone().requires_grad_()
    split_x, split_w = x.clone().requires_grad_(), weight.detach().clone().requires_grad_()
    plain = F.conv2d(plain_x, plain_w, None, 1, padding, 1, weight.shape[0])
    split = depthwise_conv2d(split_x, split_w, (1, 1), padding)
    assert split.grad_fn is not None and "SplitGrad" in type(split.grad_fn).__name__  # the custom backward is in use
    assert torch.equal(plain, split)
    grad_out = torch.randn_like(plain)
    plain.backward(grad_out)
    split.backward(grad_out)
    assert torch.equal(plain_x.grad, split_x.grad)
    torch.testing.assert_close(split_w.grad, plain_w.grad, rtol=1e-5, atol=1e-5)
    assert not torch.equal(split_w.grad, torch.zeros_like(split_w.grad))


def test_the_split_is_used_only_where_it_was_measured_faster():
    x, weight, padding = _case(3, 1)
    frozen = weight.clone()
    assert uses_split(x, weight.clone().requires_grad_(), (1, 1), padding)
    assert not uses_split(x, frozen, (1, 1), padding)  # a frozen layer has no weight gradient
    big, big_w, big_pad = _case(SMALL_MAP + 1, 1)
    assert not uses_split(big, big_w.requires_grad_(), (1, 1), big_pad)
    padded, padded_w, no_pad = _case(6, 2)  # TF pads (1, 2) here: the input comes pre-padded
    assert no_pad == (0, 0) and not uses_split(padded, padded_w.requires_grad_(), (2, 2), no_pad)
    with pytest.raises(ValueError, match="padding >= 1"):
        split_weight_grad(torch.zeros(4, 24, 2, 2), padded, padded_w, (2, 2), no_pad)
    x3, w3, pad3 = _case(3, 1, kernel=3)
    assert not uses_split(x3, w3.requires_grad_(), (1, 1), pad3)  # oneDNN's 3x3 gradient is fast already
    with torch.no_grad():  # evaluation: no graph, the plain call
        out = depthwise_conv2d(x, weight.clone().requires_grad_(), (1, 1), padding)
    assert out.grad_fn is None


def test_a_trainable_block_gets_the_same_gradients_as_with_plain_conv2d():
    """The model's own depthwise layers (SameConv2d) at a 3x3 map, where the split applies."""
    torch.manual_seed(0)
    conv = SameConv2d(16, 16, 5, groups=16, bias=False)
    x = torch.randn(8, 16, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = conv(x)
    assert "SplitGrad" in type(out.grad_fn).__name__
    out.square().sum().backward()
    ref_w = conv.weight.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    F.conv2d(ref_x, ref_w, None, 1, 2, 1, 16).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, ref_w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_only_plain_depthwise_layers_take_the_split():
    """A grouped (not depthwise) or channel-multiplying convolution keeps F.conv2d."""
    x = torch.randn(2, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    for conv in (SameConv2d(16, 16, 5, groups=8, bias=False), SameConv2d(16, 32, 5, groups=16, bias=False)):
        assert "SplitGrad" not in type(conv(x).grad_fn).__name__


def test_pooling_is_the_global_average():
    model = efficientnet_lite0(pretrained=False)
    x = torch.randn(3, 1280, 3, 3).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.pool(x), torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), rtol=1e-6, atol=1e-6)
