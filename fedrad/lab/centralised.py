"""Baselines without federation: each site alone (`local`), all sites' data in one place (`pooled`).

Simulation only. `pooled` puts every site's images on one machine, which is exactly what
fedrad exists to avoid; it is the upper bound a federation is measured against. Both reuse
the site's own training code (`fedrad.client.train.fit`, fed through `fedrad.client.features`, so the
frozen prefix is cached as at a site) on the federation's schedule: `num-server-rounds`
calls of `fit`, each `local-epochs` epochs with a fresh optimizer, BN re-estimated at the
end, and the same per-round seeds as a site in a federation. So the only difference to a
federation is what is averaged: nothing (local) or everything, by training on the union
(pooled).

With `task = survival` the local baseline trains the Cox head instead
(`fedrad.client.survival_site.fit_survival`, same schedule and seeds) and scores each site's
test split as a site in a federation does (`survival_scores`: C-index, pair counts, td-AUC,
integrated Brier score): "the same site trained alone" of issue 18. With run config
`covariates`, `run_covariate_cox` is the baseline without a network: a Cox model on the mask
covariates alone, per site and pooled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrad.client.dataset import SiteData
from fedrad.client.features import site_inputs
from fedrad.client.outputs import model_outputs
from fedrad.client.survival_site import fit_survival, risk_scores, site_covariates, survival_scores
from fedrad.client.train import Inputs, fit, pick_device, predict_proba
from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.metrics import classification_metrics
from fedrad.common.model import build_model
from fedrad.common.records import C_INDEX, IBS, TD_AUC
from fedrad.common.survival import pair_counts


def train_on_schedule(model: EfficientNetLite0, inputs: Inputs, y: np.ndarray, cfg: RunConfig,
                      times: np.ndarray | None = None, covariates: np.ndarray | None = None) -> None:
    """`num-server-rounds` rounds of `fit` (with `times`: `fit_survival`, y the events, with the run's
    `covariates` if any), seeded per round exactly as a site in a federation is."""
    for server_round in range(1, cfg.num_server_rounds + 1):
        seed, device = cfg.seed * 10_000 + server_round, pick_device(cfg.device)
        if times is None:
            fit(model, inputs, y, cfg, seed=seed, device=device)
        else:
            fit_survival(model, inputs, times, y, cfg, seed=seed, device=device, covariates=covariates)


def site_row(data: SiteData, metrics: dict[str, float], bytes_sent: int | None) -> dict[str, Any]:
    """One site's line in a strategy's results (the fields of compare.json)."""
    return {"name": data.name, "n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
            "auc": metrics["auc"], "balanced_accuracy": metrics["balanced-accuracy"], "ece": metrics["ece"],
            "bytes_sent_per_round": bytes_sent}


def run_local(sites: Sequence[SiteData], cfg: RunConfig, work: Path) -> dict[str, Any]:
    """Each site trains its own model on its own data and tests it on its own test split; nothing is sent.

    `work/<site>` holds each site's feature cache, as a site's work folder does. With
    `task = survival` each row has the survival figures instead (`survival_row`).
    """
    start = time.perf_counter()
    device = pick_device(cfg.device)
    rows = []
    for data in sites:
        model = build_model(cfg, device)
        inputs = site_inputs(model, cfg, data, Path(work) / data.name, device)
        if cfg.task == "survival":
            covariates = site_covariates(data, cfg)
            train_on_schedule(model, inputs.train, data.y_train, cfg, times=data.time_train, covariates=covariates[0])
            rows.append(survival_row(data, model, inputs.train, inputs.test, device, covariates))
            continue
        train_on_schedule(model, inputs.train, data.y_train, cfg)
        metrics = classification_metrics(data.y_test, predict_proba(model, inputs.test, device=device))
        rows.append(site_row(data, metrics, 0))
    return {"sites": rows, "wall_seconds": time.perf_counter() - start}


def survival_row(data: SiteData, model: EfficientNetLite0, train: Inputs, test: Inputs, device: torch.device,
                 covariates: tuple[np.ndarray | None, np.ndarray | None] = (None, None)) -> dict[str, Any]:
    """A site's survival figures on its test split, scored as `fedrad.client.survival_site` scores them at a site."""
    risk_train = risk_scores(model, model_outputs(model, train, device)[0][:, 0], covariates[0])
    risk_test = risk_scores(model, model_outputs(model, test, device)[0][:, 0], covariates[1])
    scores = survival_scores(data.time_train, data.y_train, risk_train, data.time_test, data.y_test, risk_test)
    return {"name": data.name, "n_train": len(data.y_train), "n_test": len(data.y_test),
            "n_events_test": int(np.sum(data.y_test)), "c_index": _finite(scores[C_INDEX]),
            "td_auc": _finite(scores[TD_AUC]), "integrated_brier": _finite(scores[IBS]), "bytes_sent_per_round": 0}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def pool_sites(sites: Sequence[SiteData]) -> SiteData:
    """All sites' images as one site (arrays and cache keys concatenated in site order)."""
    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(d, name) for d in sites])

    return SiteData(name="pooled", x_train=cat("x_train"), y_train=cat("y_train"), x_test=cat("x_test"),
                    y_test=cat("y_test"), x_unlabelled=cat("x_unlabelled"), spacings_mm=cat("spacings_mm"),
                    keys_train=sum((d.keys_train for d in sites), ()), keys_test=sum((d.keys_test for d in sites), ()),
                    keys_unlabelled=sum((d.keys_unlabelled for d in sites), ()))


def run_pooled(sites: Sequence[SiteData], cfg: RunConfig, work: Path) -> dict[str, Any]:
    """One model trained on all sites' training images together, tested on each site's test split.

    BN is re-estimated on the union, so every site is normalised with one set of statistics.
    `bytes_sent_per_round` is None: the images themselves would have to move.
    """
    start = time.perf_counter()
    device = pick_device(cfg.device)
    pooled = pool_sites(sites)
    model = build_model(cfg, device)
    inputs = site_inputs(model, cfg, pooled, Path(work) / "pooled", device)
    train_on_schedule(model, inputs.train, pooled.y_train, cfg)
    p = predict_proba(model, inputs.test, device=device)
    bounds = np.cumsum([0] + [len(d.y_test) for d in sites])
    rows = [site_row(d, classification_metrics(d.y_test, p[a:b]), None) for d, a, b in zip(sites, bounds, bounds[1:])]
    return {"sites": rows, "wall_seconds": time.perf_counter() - start}


def run_covariate_cox(sites: Sequence[SiteData], cfg: RunConfig, alpha: float = 0.01) -> dict[str, dict[str, Any]]:
    """The simplest baseline for `covariates`: a Cox model on the mask covariates alone, no CNN.

    Per site, the test C-index of a Cox model (scikit-survival, Efron ties, ridge `alpha`) fitted on
    the site's own training rows (`alone`) and on every site's training rows together (`pooled`,
    the covariates of all sites in one place). Deterministic: no seed. A gain the CNN + covariates
    head shows over this is what the network adds to the covariates.
    """
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    names = cfg.covariate_names
    if not names:
        raise ValueError("the covariates-only baseline needs run config covariates (e.g. 'log-volume')")
    train = {d.name: (site_covariates(d, cfg)[0], Surv.from_arrays(d.y_train.astype(bool), d.time_train))
             for d in sites}
    pooled = CoxPHSurvivalAnalysis(alpha=alpha, ties="efron").fit(
        np.concatenate([z for z, _ in train.values()]), np.concatenate([y for _, y in train.values()]))
    rows = {}
    for data in sites:
        z_test = site_covariates(data, cfg)[1]
        alone = CoxPHSurvivalAnalysis(alpha=alpha, ties="efron").fit(*train[data.name])
        rows[data.name] = {kind: _finite(pair_counts(data.time_test, data.y_test, model.predict(z_test)).c_index)
                           for kind, model in (("alone", alone), ("pooled", pooled))}
        rows[data.name]["coefficients_alone"] = [float(b) for b in alone.coef_]
    return {"covariates": list(names), "sites": rows, "coefficients_pooled": [float(b) for b in pooled.coef_]}
