"""Baselines without federation: each site alone (`local`), all sites' data in one place (`pooled`).

Simulation only. `pooled` puts every site's images on one machine, which is exactly what
fedrad exists to avoid; it is the upper bound a federation is measured against. Both reuse
the site's own training code (`client.train.fit`) on the federation's schedule:
`num-server-rounds` calls of `fit`, each `local-epochs` epochs with a fresh optimizer, BN
re-estimated at the end, and the same per-round seeds as a site in a federation. So the
only difference to a federation is what is averaged: nothing (local) or everything, by
training on the union (pooled).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from client.dataset import SiteData
from client.train import build_model, evaluate, fit
from common.config import RunConfig
from common.efficientnet_lite import EfficientNetLite0


def train_on_schedule(model: EfficientNetLite0, x: np.ndarray, y: np.ndarray, cfg: RunConfig) -> None:
    """`num-server-rounds` rounds of `fit`, seeded per round exactly as a site in a federation is."""
    for server_round in range(1, cfg.num_server_rounds + 1):
        fit(model, x, y, cfg, seed=cfg.seed * 10_000 + server_round)


def site_row(data: SiteData, metrics: dict[str, float], bytes_sent: int | None) -> dict[str, Any]:
    """One site's line in a strategy's results (the fields of compare.json)."""
    return {"name": data.name, "n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
            "auc": metrics["auc"], "balanced_accuracy": metrics["balanced-accuracy"], "ece": metrics["ece"],
            "bytes_sent_per_round": bytes_sent}


def run_local(sites: Sequence[SiteData], cfg: RunConfig) -> dict[str, Any]:
    """Each site trains its own model on its own data and tests it on its own test split; nothing is sent."""
    start = time.perf_counter()
    rows = []
    for data in sites:
        model = build_model(cfg)
        train_on_schedule(model, data.x_train, data.y_train, cfg)
        rows.append(site_row(data, evaluate(model, data.x_test, data.y_test), 0))
    return {"sites": rows, "wall_seconds": time.perf_counter() - start}


def run_pooled(sites: Sequence[SiteData], cfg: RunConfig) -> dict[str, Any]:
    """One model trained on all sites' training images together, tested on each site's test split.

    BN is re-estimated on the union, so every site is normalised with one set of statistics.
    `bytes_sent_per_round` is None: the images themselves would have to move.
    """
    start = time.perf_counter()
    model = build_model(cfg)
    x = np.concatenate([d.x_train for d in sites])
    y = np.concatenate([d.y_train for d in sites])
    train_on_schedule(model, x, y, cfg)
    rows = [site_row(d, evaluate(model, d.x_test, d.y_test), None) for d in sites]
    return {"sites": rows, "wall_seconds": time.perf_counter() - start}
