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
from fedrad.server.bn_registry import BNRegistry, pool_shared_bn


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


def test_registry_and_shared_mode_pool_bn_statistics_exactly_as_bn_on_the_concatenated_images():
    """Each site re-estimates BN on its own images (production `recalibrate_bn`, uneven batches); the registry's
    pooling and bn-mode=shared's aggregation of what the sites send equal the statistics of all activations."""
    torch.manual_seed(0)
    net = TwoLayer()
    sites = {"a": torch.randn(6, 2, 8, 8) + 3.0, "b": torch.randn(10, 2, 8, 8) * 2.0 - 1.0,
             "c": torch.randn(4, 2, 8, 8) * 0.5 + 8.0}
    reg = BNRegistry()
    updates = []
    for name, images in sites.items():
        assert recalibrate_bn(net, [images[:2], images[2:]]) == len(images)
        sent = {k: v.numpy().copy() for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        reg.update(name, 1, sent, len(images))  # as sent: biased variance, no conversion anywhere
        updates.append((sent, float(len(images))))
    with torch.no_grad():
        x = net.conv(torch.cat(list(sites.values()))).double().transpose(0, 1).reshape(3, -1).numpy()
    truth_mean, truth_var = x.mean(1), x.var(1)
    pooled = reg.pooled()
    np.testing.assert_allclose(pooled["norm.running_mean"], truth_mean, rtol=1e-5, atol=0)
    np.testing.assert_allclose(pooled["norm.running_var"], truth_var, rtol=1e-5, atol=0)
    shared = pool_shared_bn(updates, weighted_average(updates))  # what the strategy returns in bn-mode=shared
    np.testing.assert_allclose(shared["norm.running_mean"], truth_mean, rtol=1e-5, atol=0)
    np.testing.assert_allclose(shared["norm.running_var"], truth_var, rtol=1e-5, atol=0)
    assert shared["norm.running_var"].dtype == np.float32
    # a plain FedAvg of the variances (what shared mode did) is far off: the sites' means differ
    assert np.abs(weighted_average(updates)["norm.running_var"] / truth_var - 1).max() > 0.5


def test_a_site_training_round_leaves_the_exact_statistics_of_its_training_images():
    """Through production: `fit` at freeze-blocks 14; the first adapted BN layer's input does not depend on batching
    (the prefix is frozen), so its statistics must equal those of the concatenated activations of every image."""
    from fedrad.client.train import fit, pixel_inputs
    from fedrad.common.config import RunConfig
    from fedrad.common.finetune import first_trainable_unit
    from fedrad.common.model import build_model

    cfg = RunConfig(local_epochs=1, batch_size=4, freeze_blocks=14)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(11, 3, 32, 32)).astype(np.float32)  # 11 images: batches of 5 and 6 in the BN pass
    fit(model, pixel_inputs(model, x, 1, torch.device("cpu")), np.arange(11) % 2, cfg, seed=0)
    block = model.feature_units()[first_trainable_unit(14)]
    model.eval()
    with torch.no_grad():  # the activations of the same batches as the BN pass (6 and 5 images): a convolution's
        # float32 rounding may differ with the batch size, and a channel whose mean is near 0 would show it as a
        # relative error; what is tested here is the pooling of the batches, exactly
        h = torch.cat([block._expand_conv(model.forward_units(torch.from_numpy(part), 0, first_trainable_unit(14)))
                       for part in (x[:6], x[6:])])
    acts = h.double().transpose(0, 1).reshape(h.shape[1], -1).numpy()
    np.testing.assert_allclose(block._bn0.running_mean.numpy(), acts.mean(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(block._bn0.running_var.numpy(), acts.var(1), rtol=1e-5, atol=1e-7)
