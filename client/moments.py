"""A site's feature moments for the shift score: penultimate features, projected, summarised.

Before round 1 (`pretrained_moments`) the model is the pretrained one every site starts
from, run once on the site's raw inputs and once on its harmonised inputs: the same
feature extractor everywhere, so the two shift scores differ only by the harmonisation.
During the run (evaluate) it is the site's current model on the inputs it trains on.

The coordinator sends a fixed projection (k x 1280); the site runs its current model on
its own images, takes the 1280-d penultimate features (the input of the classifier,
captured with a forward hook so that cached and pixel inputs work alike), projects them
to k dimensions and sends only their mean (k,) and covariance (k, k)
(`fedrad.common.feature_shift.Moments`). No Flower here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedrad.client.cache import cache_folder
from fedrad.client.features import site_inputs
from fedrad.client.outputs import SiteOutputs
from fedrad.client.reference import load_inputs
from fedrad.client.train import pick_device
from fedrad.common.config import RunConfig
from fedrad.common.feature_shift import MIN_SAMPLES, Moments, moments
from fedrad.common.model import build_model
from fedrad.common.records import HARMONIZED, RAW, moment_keys

log = logging.getLogger("fedrad.site")


def feature_moments(features: np.ndarray, projection: np.ndarray, *, site: str,
                    min_count: int = MIN_SAMPLES) -> Moments | None:
    """Moments of the projected penultimate features (N, 1280), or None (logged) with fewer than `min_count` images.

    The site's policy sets `min_count` (at least twice the projection's dimension: a
    covariance of fewer images than that reveals the span of their features).
    """
    min_count = max(min_count, MIN_SAMPLES)
    if len(features) < min_count:
        log.warning("site %s: only %d images, fewer than %d: it sends no feature moments (no shift score).",
                    site, len(features), min_count)
        return None
    return moments(features.astype(np.float64) @ np.asarray(projection, dtype=np.float64).T)


def pretrained_moments(cfg: RunConfig, site_dir: Path, work_dir: Path, projection: np.ndarray | None,
                       reference: np.ndarray | None, *, site: str,
                       min_count: int = MIN_SAMPLES) -> tuple[dict[str, np.ndarray], int]:
    """Moments of the pretrained model's features on raw (and, with harmonize on, harmonised) inputs.

    Returns the arrays to send (keys `raw/feature-mean`, ... `harmonized/feature-cov`) and the
    number of images they summarise. The prefix features land in the site's feature cache,
    where the first training round finds them.
    """
    if projection is None:
        raise ValueError(f"site {site}: the shift query carries no projection; coordinator and site must run "
                         "the same fedrad version.")
    variants = [(RAW, cfg.replace(harmonize="off"))] + ([(HARMONIZED, cfg)] if cfg.harmonize != "off" else [])
    device = pick_device(cfg.device)
    arrays: dict[str, np.ndarray] = {}
    n = 0
    for prefix, variant in variants:
        data = load_inputs(variant, site_dir, reference, site=site, cache_dir=cache_folder(work_dir))
        model = build_model(cfg, device)
        inputs = site_inputs(model, cfg, data, work_dir, device)
        found = feature_moments(SiteOutputs(model, inputs, device).features("train", "test"), projection, site=site,
                                min_count=min_count)
        if found is not None:
            arrays.update(zip(moment_keys(prefix), (found.mean, found.cov)))
            n = found.n
    return arrays, n
