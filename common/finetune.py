"""Partial fine-tuning: freeze the first K backbone units, discriminative learning rates.

The seed's recipe: early layers hold generic edges and textures that transfer from
ImageNet, late layers are task specific. So the stem and the first `freeze_blocks` units are
frozen (no gradient, BN in eval mode with its pretrained statistics), and the units above
train with learning rates that shrink with depth, alpha_l = lr_max * gamma^(L - l), the
classifier (l = L) getting lr_max. Levels: 0 stem, 1..16 MBConv blocks, 17 head conv,
18 classifier. `freeze_blocks = K` freezes levels 0..K: K = 17 (`NUM_UNITS`) is the linear
probe, K = 0 freezes the stem only, K = -1 freezes nothing (full fine-tuning).

Which parameters are *shared* with the coordinator is one predicate, `shared_keys`: the
trainable parameters that are not BatchNorm. BN stays at the site (FedBN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.bn import BN_TYPES, bn_state_keys
from common.efficientnet_lite import EfficientNetLite0

NUM_UNITS = 17  # 16 MBConv blocks + the head conv, above the stem (level 0)


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer group: the parameters of one depth level and their learning rate."""

    level: int
    lr: float
    names: tuple[str, ...]


def check_freeze_blocks(freeze_blocks: int) -> None:
    """Refuse a freeze point outside -1..NUM_UNITS."""
    if not -1 <= freeze_blocks <= NUM_UNITS:
        raise ValueError(
            f"freeze-blocks must be between -1 (train everything, stem included) and {NUM_UNITS} "
            f"(linear probe); got {freeze_blocks}."
        )


def unit_of_parameter(model: EfficientNetLite0) -> dict[str, int]:
    """Depth level of every parameter name: 0 stem, 1..16 blocks, 17 head conv, 18 classifier."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    levels: dict[str, int] = {}
    for level, unit in enumerate(model.feature_units()):
        for param in unit.parameters():
            levels[name_of[id(param)]] = level
    for name, _ in model._fc.named_parameters():
        levels[f"_fc.{name}"] = NUM_UNITS + 1
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


def param_groups(model: EfficientNetLite0, *, lr_max: float, lr_decay: float) -> list[ParamGroup]:
    """Discriminative learning rates alpha_l = lr_max * lr_decay^(L - l) over trainable levels.

    L is the classifier's level (18); frozen parameters get no group at all (alpha 0).
    """
    if lr_max <= 0:
        raise ValueError(f"lr-max must be > 0; got {lr_max}.")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr-decay must be in (0, 1]; got {lr_decay}.")
    top = NUM_UNITS + 1
    by_level: dict[int, list[str]] = {}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, level in unit_of_parameter(model).items():
        if name in trainable:
            by_level.setdefault(level, []).append(name)
    return [ParamGroup(level, lr_max * lr_decay ** (top - level), tuple(names))
            for level, names in sorted(by_level.items())]


def make_optimizer(model: EfficientNetLite0, groups: list[ParamGroup], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with one group per depth level; no weight decay on BN and biases."""
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
    return torch.optim.AdamW(torch_groups)


def shared_keys(model: nn.Module, bn_mode: str = "fedbn") -> list[str]:
    """State-dict keys the coordinator averages: trainable, non-BatchNorm parameters.

    With `bn_mode="fedbn"` every BN tensor (statistics and affine) stays at the site. With
    `bn_mode="shared"` (plain FedAvg) the BN tensors of trainable units travel too.
    """
    if bn_mode not in ("fedbn", "shared"):
        raise ValueError(f"bn-mode must be 'fedbn' or 'shared'; got {bn_mode!r}.")
    bn_keys = bn_state_keys(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    keys = [k for k in model.state_dict() if k in trainable and k not in bn_keys]
    if bn_mode == "shared":
        bn_trainable_modules = {name for name, m in model.named_modules()
                                if isinstance(m, BN_TYPES) and any(p.requires_grad for p in m.parameters())}
        keys += [k for k in model.state_dict()
                 if k in bn_keys and k.rsplit(".", 1)[0] in bn_trainable_modules and not k.endswith("num_batches_tracked")]
    return keys


def local_keys(model: nn.Module, bn_mode: str = "fedbn") -> list[str]:
    """State-dict keys a site keeps between rounds: BN tensors of trainable units that are not shared.

    Frozen units never change, so they need no keeping; shared keys come back from the
    coordinator every round.
    """
    shared = set(shared_keys(model, bn_mode))
    trainable_bn = {name for name, m in model.named_modules()
                    if isinstance(m, BN_TYPES) and any(p.requires_grad for p in m.parameters())}
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] in trainable_bn and k not in shared]
