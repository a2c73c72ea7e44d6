"""Partial fine-tuning: what is frozen stays unchanged, learning rates follow alpha_max*gamma^(L-l)."""

import pytest
import torch
from torch import nn

from fedrad.common.bn import BN_TYPES, bn_state_keys
from fedrad.common.efficientnet_lite import efficientnet_lite0
from fedrad.common.finetune import (
    CLASSIFIER_LEVEL,
    LINEAR_PROBE,
    freeze_units,
    local_keys,
    make_optimizer,
    param_groups,
    set_train_mode,
    shared_keys,
    unit_of_parameter,
)


@pytest.fixture
def model():
    return efficientnet_lite0(pretrained=False, num_classes=2, seed=0)


def test_levels_cover_every_parameter_in_order(model):
    levels = unit_of_parameter(model)
    assert set(levels) == {n for n, _ in model.named_parameters()}
    assert levels["_conv_stem.weight"] == 0
    assert levels["_blocks.0._depthwise_conv.weight"] == 1
    assert levels["_blocks.15._project_conv.weight"] == 16
    assert levels["_conv_head.weight"] == 17
    assert levels["_fc.weight"] == CLASSIFIER_LEVEL


@pytest.mark.parametrize("k", [-1, 0, 5, 14, 17])
def test_freeze_marks_exactly_the_first_k_units(model, k):
    frozen = freeze_units(model, k)
    levels = unit_of_parameter(model)
    for name, p in model.named_parameters():
        assert p.requires_grad == (levels[name] > k)
        assert (name in frozen) == (levels[name] <= k)


def test_freeze_refuses_bad_k(model):
    with pytest.raises(ValueError, match="freeze-blocks must be between -1"):
        freeze_units(model, 18)


def test_frozen_weights_unchanged_after_training(model):
    k = 14
    freeze_units(model, k)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    opt = make_optimizer(model, param_groups(model, lr_max=0.05, lr_decay=0.5), weight_decay=0.01)
    set_train_mode(model, k)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    levels = unit_of_parameter(model)
    module_level = {n.rsplit(".", 1)[0]: lvl for n, lvl in levels.items()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for name in before:
        lvl = module_level.get(name.rsplit(".", 1)[0])
        if lvl is not None and lvl <= k:
            assert name not in changed, f"frozen {name} changed (BN statistics included)"
    assert "_fc.weight" in changed and "_blocks.15._project_conv.weight" in changed
    assert "_blocks.15._bn2.running_mean" in changed  # trainable BN adapts its statistics


def test_discriminative_learning_rates(model):
    freeze_units(model, 14)
    groups = param_groups(model, lr_max=0.01, lr_decay=0.5)
    by_level = {g.level: g.lr for g in groups}
    assert sorted(by_level) == [15, 16, 17, 18]
    for level, lr in by_level.items():
        assert lr == pytest.approx(0.01 * 0.5 ** (18 - level))
    opt = make_optimizer(model, groups, weight_decay=0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad, name


def test_linear_probe_trains_only_the_classifier(model):
    freeze_units(model, LINEAR_PROBE)
    assert [g.level for g in param_groups(model, lr_max=0.01, lr_decay=0.5)] == [18]
    assert shared_keys(model) == ["_fc.weight", "_fc.bias"]


def test_shared_keys_exclude_bn_found_by_type(model):
    freeze_units(model, 14)
    keys = shared_keys(model, "fedbn")
    bn = bn_state_keys(model)
    assert keys and not set(keys) & bn
    assert "_blocks.15._expand_conv.weight" in keys and "_fc.weight" in keys
    assert "_blocks.13._expand_conv.weight" not in keys  # frozen (level 14)
    assert "_blocks.14._expand_conv.weight" in keys  # level 15: trainable
    # BN is found by type even when its name does not say "bn"
    model.extra_norm = nn.BatchNorm2d(3)
    assert "extra_norm.running_mean" in bn_state_keys(model)
    assert all(isinstance(m, BN_TYPES) for n, m in model.named_modules() if n.endswith("_bn1"))


def test_shared_bn_mode_sends_trainable_bn_and_keeps_nothing_local(model):
    freeze_units(model, 14)
    shared = shared_keys(model, "shared")
    assert "_blocks.15._bn2.running_var" in shared and "_blocks.15._bn2.weight" in shared
    assert "_blocks.13._bn2.weight" not in shared
    assert local_keys(model, "shared") == [k for k in model.state_dict() if k.endswith("num_batches_tracked")
                                          and k.rsplit(".", 1)[0] in {n.rsplit(".", 1)[0] for n in shared}]
    fedbn_local = local_keys(model, "fedbn")
    assert "_blocks.15._bn2.running_var" in fedbn_local and "_bn1.weight" in fedbn_local
    assert "_blocks.13._bn2.running_var" not in fedbn_local
