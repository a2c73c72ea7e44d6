"""A small site's BatchNorm statistics, shrunk toward the federation's pooled ones (run-config `bn-shrink`).

FedBN normalises each site with its own statistics. A site with 50–80 training images
estimates them with noise a large site does not have, and its AUC suffers for it. With
`bn-shrink` = n0 > 0 the coordinator sends, with every training message, the pooled
statistics its BN registry keeps (record `bn-pooled`: one mean and one variance per channel
of each adapted layer, an aggregate over all reporting sites); after local training and the
exact re-estimation on its own images, the site blends the two by count,
w = n / (n + n0) (`fedrad.common.bn.shrink_moments`): a site with n >> n0 images keeps
practically its own statistics, one with n << n0 practically the pooled ones.

The site decides (README "What leaves a site"): it takes the record only if its names and
shapes are exactly the BN statistics of its own model (what `site_bn_stat_keys` lists) and
every value is finite with non-negative variances; anything else is refused with
`policy-refused` before any work is done. Nothing new leaves: the site still reports its own
statistics, unshrunk, to the registry (shrunk ones would feed the pool back into itself),
and keeps the shrunk ones in its model and local state, where evaluation and
`fedrad predict` read them.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict

from fedrad.client.policy import PolicyRefused
from fedrad.common.bn import shrink_moments
from fedrad.common.config import RunConfig
from fedrad.common.finetune import local_keys, site_bn_stat_keys
from fedrad.common.records import BN_POOLED, to_numpy

MEAN, VAR = "running_mean", "running_var"


def pooled_statistics(content: RecordDict, model: torch.nn.Module, cfg: RunConfig, site: str
                      ) -> dict[str, np.ndarray] | None:
    """The coordinator's pooled BN statistics this site will shrink toward, checked; None when none apply.

    None when `bn-shrink` is 0, when the run shares its BN statistics anyway
    (`bn-mode=shared`), or when the message carries no `bn-pooled` record (round 1: the
    registry is empty). Raises PolicyRefused, naming the site, when the record's names or
    shapes differ from this site's own adapted BN statistics or a value is not finite or
    a variance negative.
    """
    if cfg.bn_shrink <= 0 or BN_POOLED not in content:
        return None
    own_local = set(local_keys(model, cfg.bn_mode))
    state = model.state_dict()
    own = {k: tuple(state[k].shape) for k in site_bn_stat_keys(model) if k in own_local}
    if not own:
        return None  # bn-mode=shared: the statistics are averaged like any weight
    pooled = to_numpy(content[BN_POOLED])  # type: ignore[arg-type]
    sent = {k: tuple(v.shape) for k, v in pooled.items()}
    if sent != own:
        raise PolicyRefused(f"site {site}: the coordinator's '{BN_POOLED}' record differs from this site's own BN "
                            f"statistics: extra {sorted(set(sent) - set(own))[:5]}, missing "
                            f"{sorted(set(own) - set(sent))[:5]}, or other shapes")
    for key, value in pooled.items():
        if not np.isfinite(value).all() or (key.endswith(VAR) and (value < 0).any()):
            raise PolicyRefused(f"site {site}: the coordinator's pooled BN statistic {key} is not finite or a "
                                "variance is negative")
    return {k: np.asarray(v, dtype=np.float64) for k, v in pooled.items()}


@torch.no_grad()
def shrink_site_bn(model: torch.nn.Module, pooled: dict[str, np.ndarray] | None, count: int,
                   prior_count: float) -> dict[str, torch.Tensor]:
    """Replace the model's BN statistics by their shrunk values; return the site's own (unshrunk) copies.

    `count` is the number of images the model's statistics were estimated on (all its
    training images, `fedrad.client.train.fit`); `pooled` comes from `pooled_statistics`.
    Returns {} and changes nothing when `pooled` is None or `prior_count` is 0.
    """
    if not pooled or prior_count <= 0:
        return {}
    state = model.state_dict()
    own = {k: state[k].detach().clone() for k in pooled}
    for key in pooled:
        layer, _, part = key.rpartition(".")
        if part != MEAN:
            continue
        mean, var = shrink_moments(own[key].double().cpu().numpy(), own[f"{layer}.{VAR}"].double().cpu().numpy(),
                                   count, pooled[key], pooled[f"{layer}.{VAR}"], prior_count)
        state[key].copy_(torch.from_numpy(mean).to(state[key]))
        state[f"{layer}.{VAR}"].copy_(torch.from_numpy(var).to(state[f"{layer}.{VAR}"]))
    return own
