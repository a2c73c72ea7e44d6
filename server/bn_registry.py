"""The coordinator's per-site BatchNorm registry and the pooled statistics it implies.

Every round each site reports, for every BN layer it adapts, the per-channel running mean
and variance over its training images plus the image count (aggregates only). The registry
keeps the latest report per site (with its round and count), and pools them per layer:

    N      = sum_i n_i
    mean   = sum_i n_i mu_i / N                                  (count-weighted mean)
    var    = sum_i n_i (sigma_i^2 + (mu_i - mean)^2) / N          (law of total variance)

The second term is why an average of variances is wrong: sites whose scanners shift the
activations (different means) make the pooled population wider than any single site.
Every image has the same size after preprocessing, so images are the right weights (each
image contributes the same number of pixels per channel). Sites send population (biased,
ddof 0) variances, computed exactly over all their training images in one pass of sums and
sums of squares (`fedrad.common.bn.recalibrate_bn`): not torch's unbiased running_var, not
an average of batch variances. So the pooled statistics equal those of the concatenated
activations (tested to 1e-5). With `bn-mode=shared` the coordinator pools the BN statistics
in the shared weights the same way (`pool_shared_bn`), never as a plain mean of variances.

The pooled statistics are what a site never seen in training normalises with
(`fedrad.client.unseen`), the alternative being AdaBN on its own images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedrad.common.bn import pool_moments  # the law of total variance; also what a site shrinks with

MEAN, VAR = "running_mean", "running_var"


@dataclass(frozen=True)
class SiteBNStats:
    """One site's latest BN report: per-layer statistics, the round they came from, the image count."""

    site: str
    server_round: int
    count: int
    stats: Mapping[str, np.ndarray]  # "<layer>.running_mean" / "<layer>.running_var" -> (C,)


def pool_shared_bn(updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
                   averaged: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`averaged` (a weighted mean of `updates`) with every BN layer's running_var pooled by total variance.

    FedAvg's weighted mean is right for a running_mean but not for a running_var: the
    spread of the sites' means is missing. Each "<layer>.running_var" whose
    "<layer>.running_mean" is also shared is replaced by `pool_moments` over the sites,
    with the same weights; every other key is returned as averaged, in its dtype.
    """
    out = dict(averaged)
    weights = [float(n) for _, n in updates]
    for key in averaged:
        layer, _, part = key.rpartition(".")
        if part != VAR or f"{layer}.{MEAN}" not in averaged:
            continue
        mean, var = pool_moments([u[f"{layer}.{MEAN}"] for u, _ in updates], [u[key] for u, _ in updates], weights)
        out[f"{layer}.{MEAN}"] = mean.astype(averaged[f"{layer}.{MEAN}"].dtype)
        out[key] = var.astype(averaged[key].dtype)
    return out


def layers_of(keys: Sequence[str] | Mapping[str, object]) -> list[str]:
    """BN layer names from statistic keys ("<layer>.running_mean"), in first-seen order."""
    layers: list[str] = []
    for key in keys:
        layer, _, part = key.rpartition(".")
        if part not in (MEAN, VAR):
            raise ValueError(f"BN statistic key {key!r} must end in .{MEAN} or .{VAR}.")
        if layer not in layers:
            layers.append(layer)
    return layers


class BNRegistry:
    """Latest BN statistics per site, and their pooled statistics per layer."""

    def __init__(self) -> None:
        self.sites: dict[str, SiteBNStats] = {}

    def update(self, site: str, server_round: int, stats: Mapping[str, np.ndarray], count: int) -> None:
        """Record a site's report; an older round never replaces a newer one.

        Raises ValueError naming the site when a layer lacks its mean or variance, a
        variance is negative, or the count is not a positive integer.
        """
        if isinstance(count, bool) or int(count) != count or count <= 0:
            raise ValueError(f"site {site}: BN sample count must be a positive integer; got {count!r}.")
        for layer in layers_of(stats):
            for part in (MEAN, VAR):
                if f"{layer}.{part}" not in stats:
                    raise ValueError(f"site {site}: BN layer {layer} lacks its {part}.")
            if (np.asarray(stats[f"{layer}.{VAR}"]) < 0).any():
                raise ValueError(f"site {site}: BN layer {layer} has a negative running_var.")
        known = self.sites.get(site)
        if known is not None and known.server_round > server_round:
            return
        self.sites[site] = SiteBNStats(site, int(server_round), int(count),
                                       {k: np.array(v, copy=True) for k, v in stats.items()})

    def pooled(self, sites: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Pooled running_mean / running_var per layer over `sites` (default: all), float32.

        Layers are those every chosen site reported (sites built with the same config
        report the same layers).
        """
        chosen = [self.sites[s] for s in (sorted(self.sites) if sites is None else sites)]
        if not chosen:
            return {}
        layers = [layer for layer in layers_of(chosen[0].stats)
                  if all(f"{layer}.{MEAN}" in e.stats for e in chosen)]
        out: dict[str, np.ndarray] = {}
        for layer in layers:
            mean, var = pool_moments([e.stats[f"{layer}.{MEAN}"] for e in chosen],
                                     [e.stats[f"{layer}.{VAR}"] for e in chosen],
                                     [e.count for e in chosen])
            out[f"{layer}.{MEAN}"] = mean.astype(np.float32)
            out[f"{layer}.{VAR}"] = var.astype(np.float32)
        return out

    def summary(self) -> list[dict[str, object]]:
        """JSON-ready bookkeeping: site, round, count, number of layers."""
        return [{"site": e.site, "round": e.server_round, "count": e.count, "layers": len(layers_of(e.stats))}
                for _, e in sorted(self.sites.items())]

    def shift_scores(self) -> dict[str, float]:
        """Per site: mean over layers and channels of KL(N(site) || N(pooled)) of the BN statistics.

        A scalar "how far are this site's activations from everyone's" computed from
        aggregates only; 0 when a site matches the pool. Used to name the most shifted sites.
        """
        pooled = self.pooled()
        scores: dict[str, float] = {}
        for site, entry in self.sites.items():
            kls = []
            for layer in layers_of(pooled):
                m1 = entry.stats[f"{layer}.{MEAN}"].astype(np.float64)
                v1 = np.maximum(entry.stats[f"{layer}.{VAR}"].astype(np.float64), 1e-8)
                m0 = pooled[f"{layer}.{MEAN}"].astype(np.float64)
                v0 = np.maximum(pooled[f"{layer}.{VAR}"].astype(np.float64), 1e-8)
                kls.append(float(np.mean(0.5 * (v1 / v0 + (m1 - m0) ** 2 / v0 - 1 + np.log(v0 / v1)))))
            scores[site] = float(np.mean(kls)) if kls else 0.0
        return scores
