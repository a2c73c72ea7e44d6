"""The backbone is the real EfficientNet-Lite0 with the real ImageNet weights."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedrad.common.efficientnet_lite import (
    INPUT_SCALING,
    NUM_BLOCKS,
    EfficientNetLite0,
    efficientnet_lite0,
    weights_path,
)


def test_packaged_weights_load_exactly():
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    result = EfficientNetLite0().load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(state) == 296
    assert NUM_BLOCKS == 16


def test_a_cat_photo_is_a_cat():
    """Real weights: scikit-image's cat photo scores ImageNet cat classes (281-285) on top."""
    skdata = pytest.importorskip("skimage.data")
    image = torch.tensor(skdata.chelsea() / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    scale, shift = INPUT_SCALING
    with torch.no_grad():
        probs = efficientnet_lite0(pretrained=True).eval()(image * scale + shift).softmax(1)[0]
    top3 = probs.topk(3).indices.tolist()
    assert set(top3) <= {281, 282, 283, 284, 285}, top3
    assert probs[281:286].sum() > 0.6


def test_random_init_is_not_a_cat_detector():
    """The cat test above could fail: an untrained network gives no confident class."""
    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=False).eval()
    with torch.no_grad():
        probs = model(torch.rand(1, 3, 224, 224)).softmax(1)[0]
    assert probs.max() < 0.2


def test_new_head_is_seeded_and_same_everywhere():
    a = efficientnet_lite0(pretrained=False, num_classes=2, seed=3)
    b = efficientnet_lite0(pretrained=False, num_classes=2, seed=3)
    c = efficientnet_lite0(pretrained=False, num_classes=2, seed=4)
    assert a._fc.weight.shape == (2, 1280)
    assert torch.equal(a._fc.weight, b._fc.weight)
    assert not torch.equal(a._fc.weight, c._fc.weight)


@pytest.mark.parametrize("size", [96, 97, 64])
def test_tf_same_padding_keeps_ceil_sizes(size):
    model = efficientnet_lite0(pretrained=False).eval()
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        stem = model._conv_stem(x)
    assert stem.shape[-1] == int(np.ceil(size / 2))
    with torch.no_grad():
        assert model.features(x).shape == (1, 1280)


@pytest.mark.parametrize(("size", "kernel", "stride"), [(12, 1, 1), (12, 3, 1), (11, 5, 1), (12, 3, 2), (11, 5, 2)])
def test_same_padding_matches_tensorflow_padding_by_hand(size, kernel, stride):
    """The conv's own (symmetric) padding and the explicit asymmetric pad give TF's "same" output."""
    from fedrad.common.efficientnet_lite import SameConv2d

    torch.manual_seed(0)
    conv = SameConv2d(4, 6, kernel, stride=stride, bias=False)
    x = torch.randn(2, 4, size, size)
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)  # TF: extra pixel right/bottom
    pads = [total // 2, total - total // 2] * 2
    expected = F.conv2d(F.pad(x, pads), conv.weight, None, stride)
    out = conv(x)
    assert out.shape[-1] == -(-size // stride)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
