"""BatchNorm bookkeeping: which state-dict keys belong to BatchNorm layers.

BN layers are found by module type, never by name: Flower's own FedBN how-to tests
`"bn" in name`, which silently misses any BN not named so (and catches non-BN layers
that happen to be). Per-site BN is how fedrad answers covariate shift between scanners
(FedBN: each site keeps its BN statistics and affine parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm module of `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BN_TYPES)}


def bn_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of all BN layers: weight, bias, running_mean, running_var, num_batches_tracked."""
    keys: set[str] = set()
    for name, module in bn_modules(model).items():
        prefix = f"{name}." if name else ""
        keys.update(prefix + k for k in module.state_dict())
    return keys


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], *,
                   layers: Iterable[nn.Module] | None = None,
                   forward: Callable[[torch.Tensor], object] | None = None) -> int:
    """Re-estimate BN running statistics as the exact average over `batches` (AdaBN / precise BN).

    Why: pretrained BN uses momentum 0.01 (TF's 0.99 decay), so a few dozen local steps
    leave the running statistics mostly ImageNet's while training normalised with the
    site's batch statistics; evaluation then sees a different network. A forward pass
    over the site's own images with a cumulative average fixes that. Forward passes only:
    no labels, no gradient.

    Args:
        layers: the BN layers to re-estimate; default: those with trainable affine
            parameters (frozen BN belongs to the fixed feature extractor and keeps its
            statistics unless named here, e.g. for AdaBN inside the frozen prefix).
        forward: how to run a batch (default `model(batch)`), e.g. only a prefix.
    Returns the number of BN layers re-estimated. Leaves the model in eval mode.
    """
    chosen = list(layers) if layers is not None else [
        m for m in bn_modules(model).values() if any(p.requires_grad for p in m.parameters())]
    if not chosen:
        return 0
    run = forward or model
    model.eval()
    saved = {}
    for m in chosen:
        saved[m] = m.momentum
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over batches
        m.train()
    seen = 0
    for batch in batches:
        if len(batch) >= 2:
            run(batch)
            seen += 1
    for m in chosen:
        m.momentum = saved[m]
        m.eval()
    if seen == 0:
        raise ValueError("recalibrate_bn needs at least one batch of 2 or more images.")
    return len(chosen)
