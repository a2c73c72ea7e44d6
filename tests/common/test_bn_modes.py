"""BN modes: which BatchNorm tensors travel (fedbn / silobn / shared), found by module type."""

import numpy as np
import pytest
import torch
from torch import nn

from fedrad.common.bn import bn_modules, recalibrate_bn
from fedrad.common.efficientnet_lite import efficientnet_lite0
from fedrad.common.finetune import (
    LINEAR_PROBE,
    SHARED_BN_PARTS,
    freeze_units,
    local_keys,
    shared_keys,
    site_bn_stat_keys,
    trainable_bn_modules,
)
from fedrad.server.aggregate import weighted_average
from fedrad.server.bn_registry import BNRegistry


@pytest.fixture(scope="module")
def model():
    m = efficientnet_lite0(pretrained=False, num_classes=2, seed=0)
    freeze_units(m, 14)
    return m


def parts(keys, modules):
    return {k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] in modules}


@pytest.mark.parametrize("mode, shared_parts, local_parts", [
    ("fedbn", set(), {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}),
    ("silobn", {"weight", "bias"}, {"running_mean", "running_var", "num_batches_tracked"}),
    ("shared", {"weight", "bias", "running_mean", "running_var"}, {"num_batches_tracked"}),
])
def test_each_mode_splits_trainable_bn_between_coordinator_and_site(model, mode, shared_parts, local_parts):
    trainable_bn = trainable_bn_modules(model)
    shared, local = shared_keys(model, mode), local_keys(model, mode)
    assert parts(shared, trainable_bn) == shared_parts
    assert parts(local, trainable_bn) == local_parts
    assert not set(shared) & set(local)
    bn_of_trainable = {k for k in model.state_dict() if k.rpartition(".")[0] in trainable_bn}
    assert bn_of_trainable <= set(shared) | set(local)  # every adapted BN tensor is either shared or kept
    frozen_bn = set(bn_modules(model)) - trainable_bn
    assert not parts(shared + local, frozen_bn)  # frozen BN never travels and needs no keeping
    # the non-BN part is the same in every mode: trainable convolutions and the head
    non_bn = [k for k in shared if k.rpartition(".")[0] not in bn_modules(model)]
    assert non_bn == shared_keys(model, "fedbn")
    assert shared == [k for k in model.state_dict() if k in set(shared)]  # state-dict order


def test_trainable_bn_are_the_units_above_the_freeze_point(model):
    assert trainable_bn_modules(model) == {"_blocks.14._bn0", "_blocks.14._bn1", "_blocks.14._bn2",
                                           "_blocks.15._bn0", "_blocks.15._bn1", "_blocks.15._bn2", "_bn1"}
    assert SHARED_BN_PARTS["fedbn"] == frozenset()


def test_bn_found_by_type_whatever_its_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.normaliser = nn.BatchNorm2d(4)  # no "bn" in the name
            self.bnlike_linear = nn.Linear(4, 2)  # "bn" in the name, not BN

    odd = Odd()
    assert "bnlike_linear.weight" in shared_keys(odd, "fedbn")
    assert "normaliser.weight" not in shared_keys(odd, "fedbn")
    assert "normaliser.weight" in shared_keys(odd, "silobn") and "normaliser.running_var" in local_keys(odd, "silobn")
    assert site_bn_stat_keys(odd) == ["normaliser.running_mean", "normaliser.running_var"]


def test_unknown_mode_is_refused(model):
    with pytest.raises(ValueError, match="bn-mode must be one of .*'silobn'.*got 'bn'"):
        shared_keys(model, "bn")


def test_site_bn_statistics_are_those_of_trainable_bn_only(model):
    keys = site_bn_stat_keys(model)
    assert keys and all(k.endswith(("running_mean", "running_var")) for k in keys)
    assert {k.rpartition(".")[0] for k in keys} == trainable_bn_modules(model)
    probe = efficientnet_lite0(pretrained=False, num_classes=2, seed=0)
    freeze_units(probe, LINEAR_PROBE)
    assert site_bn_stat_keys(probe) == []  # linear probe: no BN adapts, nothing to report


def test_silobn_averages_affine_only(model):
    """Two sites' silobn updates: BN weight/bias averaged by sample count; statistics never reach the average."""
    keys = shared_keys(model, "silobn")
    state = model.state_dict()
    updates = []
    for value, n in ((1.0, 10), (4.0, 30)):
        updates.append(({k: np.full(tuple(state[k].shape), value, np.float32) for k in keys}, n))
    out = weighted_average(updates)
    assert set(out) == set(keys)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in out)
    np.testing.assert_allclose(out["_blocks.15._bn2.weight"], 3.25)
    np.testing.assert_allclose(out["_bn1.bias"], 3.25)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.norm(self.conv(x))


def test_registry_pools_real_bn_statistics_exactly_as_bn_on_the_concatenated_images():
    """Each site re-estimates BN on its own images; pooling their reports gives BN of all images together."""
    torch.manual_seed(0)
    net = TwoLayer()
    sites = {"a": torch.randn(6, 2, 8, 8) + 3.0, "b": torch.randn(10, 2, 8, 8) * 2.0 - 1.0}
    per_pixel = 8 * 8
    reg = BNRegistry()
    for name, images in sites.items():
        recalibrate_bn(net, [images])  # one batch: exact mean, unbiased variance over n*H*W values
        m = len(images) * per_pixel
        var = net.norm.running_var.numpy() * (m - 1) / m  # BN stores the unbiased variance
        reg.update(name, 1, {"norm.running_mean": net.norm.running_mean.numpy(), "norm.running_var": var},
                   len(images))
    recalibrate_bn(net, [torch.cat(list(sites.values()))])
    m_all = 16 * per_pixel
    pooled = reg.pooled()
    np.testing.assert_allclose(pooled["norm.running_mean"], net.norm.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled["norm.running_var"], net.norm.running_var.numpy() * (m_all - 1) / m_all,
                               rtol=1e-5)
