"""BN helpers: found by type; precise re-estimation gives the exact statistics of the data."""

import pytest
import torch
from torch import nn

from fedrad.common.bn import bn_modules, bn_state_keys, recalibrate_bn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.norm = nn.BatchNorm2d(3)  # not named "bn"
        self.frozen_norm = nn.BatchNorm2d(3)
        self.frozen_norm.requires_grad_(False)

    def forward(self, x):
        return self.frozen_norm(self.norm(self.conv(x)))


def test_bn_found_by_type_not_name():
    model = Tiny()
    assert set(bn_modules(model)) == {"norm", "frozen_norm"}
    assert "norm.running_var" in bn_state_keys(model) and "conv.weight" not in bn_state_keys(model)


def test_recalibration_gives_exact_statistics_of_all_batches():
    torch.manual_seed(0)
    model = Tiny()
    data = torch.randn(10, 2, 4, 4) * 3 + 1
    before_frozen = model.frozen_norm.running_mean.clone()
    assert recalibrate_bn(model, [data[:4], data[4:8], data[8:]]) == 1
    with torch.no_grad():
        feats = model.conv(data).transpose(0, 1).reshape(3, -1)
    # equal-size batches would be an exact mean; a cumulative average weights batches equally
    per_batch = [model.conv(b).transpose(0, 1).reshape(3, -1) for b in (data[:4], data[4:8], data[8:])]
    expected_mean = torch.stack([f.mean(1) for f in per_batch]).mean(0)
    torch.testing.assert_close(model.norm.running_mean, expected_mean.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(model.norm.running_mean, feats.mean(1), atol=0.3)
    assert torch.equal(model.frozen_norm.running_mean, before_frozen)  # frozen BN keeps its statistics
    assert model.norm.momentum == 0.1 and not model.training


def test_recalibration_refuses_no_usable_batch():
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(Tiny(), [torch.randn(1, 2, 4, 4)])
