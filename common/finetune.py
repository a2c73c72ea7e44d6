"""Partial fine-tuning: freeze the first K backbone units, discriminative learning rates.

The seed's recipe: early layers hold generic edges and textures that transfer from
ImageNet, late layers are task specific. So the stem and the first `freeze_blocks` units are
frozen (no gradient, BN in eval mode with its pretrained statistics), and the units above
train with learning rates that shrink with depth, alpha_l = lr_max * gamma^(L - l), the
classifier (l = L) getting lr_max. Levels: the feature units of `EfficientNetLite0.feature_units`
(0 stem, 1..16 MBConv blocks, 17 head conv), then 18 the classifier. `freeze_blocks = K`
freezes levels 0..K: K = 17 (`LINEAR_PROBE`) is the linear probe, K = 0 freezes the stem
only, K = -1 (`FULL_FINETUNE`) freezes nothing. This module is the one place that meaning
lives: the config's range check, the optimizer's levels and the cached prefix all ask it.

Which parameters are *shared* with the coordinator is one predicate, `shared_keys`: the
trainable parameters that are not BatchNorm, plus the parts of trainable BatchNorm layers
(found by module type) that the bn-mode shares, `SHARED_BN_PARTS`: none (FedBN), the affine
weight/bias (SiloBN), or affine and statistics (plain FedAvg).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedrad.common.bn import bn_modules, bn_state_keys
from fedrad.common.covariates import MODULE as COVARIATE_MODULE
from fedrad.common.efficientnet_lite import NUM_UNITS, EfficientNetLite0

FULL_FINETUNE = -1  # freeze-blocks that freezes nothing
LINEAR_PROBE = NUM_UNITS - 1  # 17: freeze-blocks that freezes every feature unit, head conv included
CLASSIFIER_LEVEL = NUM_UNITS  # 18: the level of the decision layer `_fc`, above every feature unit

# Which state-dict entries of a *trainable* BatchNorm layer the coordinator averages, per bn-mode.
# fedbn (Li et al. 2021): none, statistics and affine both follow the site's scanner;
# silobn (Andreux et al. 2020): the affine weight/bias, statistics stay local;
# shared (plain FedAvg): everything but the step counter. Frozen BN layers never travel.
SHARED_BN_PARTS: dict[str, frozenset[str]] = {
    "fedbn": frozenset(),
    "silobn": frozenset({"weight", "bias"}),
    "shared": frozenset({"weight", "bias", "running_mean", "running_var"}),
}
BN_MODES = tuple(SHARED_BN_PARTS)
BN_STAT_PARTS = ("running_mean", "running_var")


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer group: the parameters of one depth level and their learning rate."""

    level: int
    lr: float
    names: tuple[str, ...]


def check_freeze_blocks(freeze_blocks: int) -> None:
    """Refuse a freeze point outside FULL_FINETUNE..LINEAR_PROBE (the one range check)."""
    if not FULL_FINETUNE <= freeze_blocks <= LINEAR_PROBE:
        raise ValueError(
            f"freeze-blocks must be between {FULL_FINETUNE} (train everything, stem included) and "
            f"{LINEAR_PROBE} (linear probe); got {freeze_blocks}."
        )


def first_trainable_unit(freeze_blocks: int) -> int:
    """Feature units [0, first_trainable_unit) are frozen: the prefix a site may compute once and cache."""
    return freeze_blocks + 1


def unit_of_parameter(model: EfficientNetLite0) -> dict[str, int]:
    """Depth level of every parameter name: its feature unit (0 stem .. 17 head conv), or CLASSIFIER_LEVEL."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    levels: dict[str, int] = {}
    for level, unit in enumerate(model.feature_units()):
        for param in unit.parameters():
            levels[name_of[id(param)]] = level
    for name, _ in model._fc.named_parameters():
        levels[f"_fc.{name}"] = CLASSIFIER_LEVEL
    for name in name_of.values():  # task = survival with covariates: beta sits beside the decision layer
        if name.startswith(f"{COVARIATE_MODULE}."):
            levels[name] = CLASSIFIER_LEVEL
    return levels


def freeze_units(model: EfficientNetLite0, freeze_blocks: int) -> set[str]:
    """Freeze the stem and the first `freeze_blocks` blocks; return the frozen parameter names.

    `freeze_blocks = -1` freezes nothing (full fine-tuning). Frozen units are also put in
    eval mode by `set_train_mode`, so their BN statistics stay the pretrained ones.
    """
    check_freeze_blocks(freeze_blocks)
    levels = unit_of_parameter(model)
    frozen = {name for name, level in levels.items() if level <= freeze_blocks}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return frozen


def set_train_mode(model: EfficientNetLite0, freeze_blocks: int) -> None:
    """model.train(), but frozen units (and their BN) in eval mode: a frozen unit is a fixed function."""
    model.train()
    for level, unit in enumerate(model.feature_units()):
        if level <= freeze_blocks:
            unit.eval()


def param_groups(model: EfficientNetLite0, *, lr_max: float, lr_decay: float,
                 covariate_lr: float | None = None) -> list[ParamGroup]:
    """Discriminative learning rates alpha_l = lr_max * lr_decay^(L - l) over trainable levels.

    L is the classifier's level (18); frozen parameters get no group at all (alpha 0). The
    covariates' coefficients (`fedrad.common.covariates`), when the model has them, get a
    group of their own at `covariate_lr` (None: lr_max, like the decision layer).
    """
    if lr_max <= 0:
        raise ValueError(f"lr-max must be > 0; got {lr_max}.")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr-decay must be in (0, 1]; got {lr_decay}.")
    top = CLASSIFIER_LEVEL
    by_level: dict[int, list[str]] = {}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, level in unit_of_parameter(model).items():
        if name in trainable:
            by_level.setdefault(level, []).append(name)
    beta = tuple(name for name in by_level.get(top, []) if name.startswith(f"{COVARIATE_MODULE}."))
    if beta:
        by_level[top] = [name for name in by_level[top] if name not in beta]
    groups = [ParamGroup(level, lr_max * lr_decay ** (top - level), tuple(names))
              for level, names in sorted(by_level.items()) if names]
    return groups + ([ParamGroup(top, lr_max if covariate_lr is None else covariate_lr, beta)] if beta else [])


def make_optimizer(model: EfficientNetLite0, groups: list[ParamGroup], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with one group per depth level; no weight decay on BN and biases.

    `fused=True`: one kernel updates every tensor of a group (CPU and CUDA). A cached step's
    suffix is small, so the per-tensor loop of the default implementation was 12 % of it
    (measured: cached epoch 0.71 -> 0.64 s on one thread, 325 images).
    """
    params = dict(model.named_parameters())
    no_decay = bn_state_keys(model) | {n for n in params if n.endswith(".bias")}
    torch_groups = []
    for group in groups:
        decay = [params[n] for n in group.names if n not in no_decay]
        plain = [params[n] for n in group.names if n in no_decay]
        if decay:
            torch_groups.append({"params": decay, "lr": group.lr, "weight_decay": weight_decay})
        if plain:
            torch_groups.append({"params": plain, "lr": group.lr, "weight_decay": 0.0})
    return torch.optim.AdamW(torch_groups, fused=True)


def check_bn_mode(bn_mode: str) -> None:
    """Refuse an unknown bn-mode, naming the known ones."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn-mode must be one of {BN_MODES}; got {bn_mode!r}.")


def trainable_bn_modules(model: nn.Module) -> set[str]:
    """Names of the BatchNorm layers (by module type) whose affine parameters train.

    These are the layers that adapt to a site: `fit` re-estimates their statistics on the
    site's own images. Frozen BN layers keep the pretrained statistics everywhere.
    """
    return {name for name, m in bn_modules(model).items() if any(p.requires_grad for p in m.parameters())}


def shared_keys(model: nn.Module, bn_mode: str = "fedbn") -> list[str]:
    """State-dict keys the coordinator averages, in state-dict order.

    Trainable non-BN parameters always; of each trainable BN layer the parts
    `SHARED_BN_PARTS[bn_mode]` (none for fedbn, weight/bias for silobn, all but
    num_batches_tracked for shared).
    """
    check_bn_mode(bn_mode)
    all_bn = set(bn_modules(model))
    trainable_bn = trainable_bn_modules(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    keys = []
    for key in model.state_dict():
        module, _, part = key.rpartition(".")
        if module in all_bn:
            if module in trainable_bn and part in SHARED_BN_PARTS[bn_mode]:
                keys.append(key)
        elif key in trainable:
            keys.append(key)
    return keys


def local_keys(model: nn.Module, bn_mode: str = "fedbn") -> list[str]:
    """State-dict keys a site keeps between rounds: BN tensors of trainable units that are not shared.

    Frozen units never change, so they need no keeping; shared keys come back from the
    coordinator every round.
    """
    shared = set(shared_keys(model, bn_mode))
    trainable_bn = trainable_bn_modules(model)
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] in trainable_bn and k not in shared]


def site_bn_stat_keys(model: nn.Module) -> list[str]:
    """running_mean / running_var of every trainable BN layer: what a site reports to the BN registry.

    Per-channel aggregates over all of a site's training images (no per-image value), sent
    with the image count so the coordinator can pool them (`fedrad.server.bn_registry`).
    """
    trainable_bn = trainable_bn_modules(model)
    return [k for k in model.state_dict()
            if k.rpartition(".")[0] in trainable_bn and k.rpartition(".")[2] in BN_STAT_PARTS]
