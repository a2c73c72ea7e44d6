"""BN helpers: found by type; precise re-estimation gives the exact statistics of the data."""

import copy

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


class Deep(nn.Module):
    """Two BN layers in a row: the second one's input depends on how the first normalised."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.norm = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm(self.conv(x)))))


def shifted_batches(seed: int = 0) -> list[torch.Tensor]:
    """Uneven batches (4, 3, 5 images) whose means differ: the case an average of batch variances gets wrong."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 6, 6, generator=g) * s + o for n, s, o in ((4, 1.0, 0.0), (3, 2.0, 3.0), (5, 0.5, -2.0))]


def concatenated_inputs(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """Every value `layer` sees when `model` runs on `batches` in training mode, per channel (C, m), float64."""
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double()))
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    x = torch.cat(seen)
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def test_recalibration_gives_the_statistics_of_the_concatenated_activations():
    torch.manual_seed(0)
    model, batches = Deep(), shifted_batches()
    reference = copy.deepcopy(model)
    truth = {name: concatenated_inputs(reference, getattr(reference, name), batches) for name in ("norm", "norm2")}
    assert recalibrate_bn(model, batches) == 12  # images seen
    for name, x in truth.items():
        layer = getattr(model, name)
        torch.testing.assert_close(layer.running_mean.double(), x.mean(1), rtol=1e-5, atol=0)
        torch.testing.assert_close(layer.running_var.double(), x.var(1, correction=0), rtol=1e-5, atol=0)
    # what it replaced would fail here: the mean of per-batch (unbiased) variances misses the batch means' spread
    per_batch = [model.conv(b).detach().double().transpose(0, 1).reshape(3, -1) for b in batches]
    averaged = torch.stack([f.var(1) for f in per_batch]).mean(0)
    assert ((averaged - truth["norm"].var(1, correction=0)).abs() / truth["norm"].var(1, correction=0)).max() > 0.05
    assert model.norm.momentum == 0.1 and not model.training


def test_recalibration_leaves_frozen_bn_alone():
    torch.manual_seed(0)
    model = Tiny()
    before_frozen = model.frozen_norm.running_mean.clone()
    recalibrate_bn(model, [torch.randn(4, 2, 4, 4) * 3 + 1])
    assert torch.equal(model.frozen_norm.running_mean, before_frozen)  # frozen BN keeps its statistics


def test_recalibration_refuses_no_usable_batch():
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(Tiny(), [torch.randn(1, 2, 4, 4)])
