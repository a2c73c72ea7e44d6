"""BatchNorm bookkeeping: which state-dict keys belong to BatchNorm layers.

BN layers are found by module type, never by name: Flower's own FedBN how-to tests
`"bn" in name`, which silently misses any BN not named so (and catches non-BN layers
that happen to be). Per-site BN is how fedrad answers covariate shift between scanners
(FedBN: each site keeps its BN statistics and affine parameters).
"""

from __future__ import annotations

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
