"""BatchNorm bookkeeping: which state-dict keys belong to BatchNorm layers.

BN layers are found by module type, never by name: Flower's own FedBN how-to tests
`"bn" in name`, which silently misses any BN not named so (and catches non-BN layers
that happen to be). Per-site BN is how fedrad answers covariate shift between scanners
(FedBN: each site keeps its BN statistics and affine parameters). Per-channel statistics
of groups pool by the law of total variance (`pool_moments`: the coordinator's registry),
and a small site may shrink its own toward the pooled ones (`shrink_moments`, run-config
`bn-shrink`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
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
    """Set BN statistics to the exact population mean and biased variance of what each layer sees (AdaBN / precise BN).

    Why: pretrained BN uses momentum 0.01 (TF's 0.99 decay), so a few dozen local steps
    leave the running statistics mostly ImageNet's while training normalised with the
    site's batch statistics; evaluation then sees a different network. One forward pass
    over the site's own images fixes that. Forward passes only: no labels, no gradient.

    Each chosen layer's input is summed and squared-summed per channel in float64 over
    every image and pixel of every batch, so the statistics are those of the concatenated
    activations: mean = Σx / m, var = Σx² / m − mean² (biased, what BN divides by at
    evaluation and what the coordinator's law-of-total-variance pooling assumes). An
    average of per-batch means and variances, torch's cumulative mode, leaves out the
    spread of the batch means and weights a short last batch like a full one; torch's
    running_var is moreover unbiased. During the pass the layers normalise with their
    batch statistics, as in training.

    Args:
        layers: the BN layers to re-estimate; default: those with trainable affine
            parameters (frozen BN belongs to the fixed feature extractor and keeps its
            statistics unless named here, e.g. for AdaBN inside the frozen prefix).
        forward: how to run a batch (default `model(batch)`), e.g. only a prefix.
    Returns the number of images the statistics were computed on. Leaves the model in eval mode.
    """
    chosen = list(layers) if layers is not None else [
        m for m in bn_modules(model).values() if any(p.requires_grad for p in m.parameters())]
    if not chosen:
        return 0
    run = forward or model
    model.eval()
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def accumulate(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().double()
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        acc = sums.setdefault(module, [torch.zeros(x.shape[1], dtype=torch.float64, device=x.device),
                                       torch.zeros(x.shape[1], dtype=torch.float64, device=x.device), 0])
        acc[0] += per_channel.sum(dim=1)
        acc[1] += (per_channel * per_channel).sum(dim=1)
        acc[2] += per_channel.shape[1]

    hooks = [m.register_forward_pre_hook(accumulate) for m in chosen]
    for m in chosen:
        m.train()
    images = 0
    try:
        for batch in batches:
            if len(batch) >= 2:
                run(batch)
                images += len(batch)
    finally:
        for hook in hooks:
            hook.remove()
        for m in chosen:
            m.eval()
    if images == 0:
        raise ValueError("recalibrate_bn needs at least one batch of 2 or more images.")
    for m in chosen:
        total, squares, count = sums[m]
        mean = total / count
        m.running_mean.copy_(mean.to(m.running_mean))
        m.running_var.copy_((squares / count - mean * mean).clamp_min(0).to(m.running_var))
    return images


def pool_moments(means: Sequence[np.ndarray], variances: Sequence[np.ndarray],
                 counts: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the union of groups, from each group's mean, variance and size.

    Exact (up to rounding) for population variances: equals np.mean / np.var of the
    concatenated data. Accumulates in float64.
    """
    if not means or len(means) != len(variances) or len(means) != len(counts):
        raise ValueError(f"pool_moments needs as many means, variances and counts (>= 1); got "
                         f"{len(means)}, {len(variances)}, {len(counts)}.")
    n = np.asarray(counts, dtype=np.float64)
    if not (n > 0).all():
        raise ValueError(f"every group needs a positive count; got {list(counts)}.")
    w = n / n.sum()
    mu = np.stack([np.asarray(m, dtype=np.float64) for m in means])
    var = np.stack([np.asarray(v, dtype=np.float64) for v in variances])
    shape = (-1,) + (1,) * (mu.ndim - 1)
    mean = (w.reshape(shape) * mu).sum(axis=0)
    total = (w.reshape(shape) * (var + (mu - mean) ** 2)).sum(axis=0)
    return mean, total


def shrink_moments(mean: np.ndarray, var: np.ndarray, count: float, pooled_mean: np.ndarray,
                   pooled_var: np.ndarray, prior_count: float) -> tuple[np.ndarray, np.ndarray]:
    """A site's BN statistics shrunk toward the pooled ones by count (empirical Bayes), float64.

    The site's n images weigh w = n / (n + n0) against n0 pseudo-images drawn from the
    pooled population: mean' = w·mean + (1 − w)·pooled_mean, and the variance is that of
    the same two-part mixture (law of total variance, `pool_moments`), so it includes the
    spread between the two means and never falls below either part's weighted variance.
    n0 = 0 returns the site's own statistics unchanged (plain FedBN). Why: a site with a
    few dozen images estimates its per-channel statistics with noise that a large site
    does not have; n0 sets how many images of its own a site needs before it trusts them.
    """
    if count <= 0 or prior_count < 0:
        raise ValueError(f"shrink_moments needs a positive image count and n0 >= 0; got {count}, {prior_count}.")
    if prior_count == 0:
        return np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    return pool_moments([mean, pooled_mean], [var, pooled_var], [count, prior_count])
