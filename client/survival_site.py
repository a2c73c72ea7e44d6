"""Survival at one site (`task = survival`): train the Cox head, score it, keep the risk scores here.

The network is the classifier's (same partially fine-tuned backbone, per-site BatchNorm, the
same shared/local split); only the head has one output, a log hazard ratio, trained with the
Cox partial likelihood of each batch (`fedrad.common.survival.cox_loss`). The coordinator
averages the head and the unfrozen layers exactly as for classification.

Evaluation computes, on the test split, per site: Harrell's C-index and its pair counts
(concordant, discordant, tied in risk: the coordinator adds them up into a federated
C-index), the time-dependent AUC at the split's median follow-up and the integrated Brier
score (scikit-survival; survival curves from a Breslow baseline fitted on the site's own
training risks), and the Cox loss; with a slice bag (`slices-per-lesion` k) a patient's risk
is the mean of its k slices' (`fedrad.client.outputs.model_outputs`). Only those scalars
leave, and only when the split holds at least `min-count` images and `min-count` events. The
risk scores, the survival curves and the Kaplan-Meier plot of the predicted risk groups stay
in the site's work folder.

With run config `covariates` (`fedrad.common.covariates`) a patient's risk is the network's
output plus beta . z, z its mask covariates (e.g. ln lesion volume in mL), trained in the same
partial likelihood; z never leaves the site, beta is averaged like the head.
No Flower here.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from fedrad.client.dataset import SiteData
from fedrad.client.outputs import SiteOutputs
from fedrad.client.train import Inputs, train_epochs
from fedrad.common.config import RunConfig
from fedrad.common.covariates import covariate_risk, select
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.records import C_INDEX, IBS, N_EVENTS, PAIRS, TD_AUC
from fedrad.common.survival import cox_loss, pair_counts

log = logging.getLogger("fedrad.site")
TIES = "efron"
KM_PLOT = "km-risk-groups.png"  # in the site's work folder; never sent


def site_covariates(data: SiteData, cfg: RunConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The run's covariates of the (train, test) rows, (None, None) without `covariates`.

    Raises:
        ValueError: a row without them (a 2-D image row), naming the site and the count.
    """
    names = cfg.covariate_names
    if not names:
        return None, None
    return (select(data.covariates_train, names, site=data.name), select(data.covariates_test, names, site=data.name))


def risk_scores(model: EfficientNetLite0, network_risk: np.ndarray, covariates: np.ndarray | None) -> np.ndarray:
    """Each patient's log hazard ratio: the network's output, plus beta . z with covariates."""
    if covariates is None:
        return network_risk
    with torch.no_grad():
        return network_risk + covariate_risk(model, covariates).double().cpu().numpy()


def fit_survival(model: EfficientNetLite0, inputs: Inputs, time: np.ndarray, event: np.ndarray, cfg: RunConfig, *,
                 seed: int, device: torch.device = torch.device("cpu"),
                 covariates: np.ndarray | None = None) -> dict[str, float]:
    """Train the unfrozen part on the Cox partial likelihood of each batch; return mean loss and timing.

    Mirrors `fedrad.client.train.fit` (same seeded order, views, discriminative rates, BN
    re-estimated on all training images afterwards); a batch without an event has no
    partial likelihood and is skipped. `covariates` (N, c), with a model that has their
    coefficients (`build_model` with run config `covariates`), add beta . z to each risk.
    """
    n = len(time)
    if n < 2 or len(event) != n:
        raise ValueError(f"A site needs at least 2 training rows with time and event to train; got {n}.")
    times = torch.as_tensor(time, dtype=torch.float64, device=device)
    events = torch.as_tensor(event, dtype=torch.float64, device=device)
    if covariates is not None and len(covariates) != n:
        raise ValueError(f"covariates have {len(covariates)} rows for {n} training rows")
    z = None if covariates is None else torch.as_tensor(covariates, dtype=torch.float32, device=device)

    def risk(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return logits[:, 0] if z is None else logits[:, 0] + covariate_risk(model, z[idx])

    return train_epochs(model, inputs, n, cfg, seed=seed, device=device,
                        loss=lambda logits, idx: cox_loss(risk(logits, idx), times[idx], events[idx], TIES),
                        usable=lambda idx: bool(events[idx].any()))


def survival_scores(time_train: np.ndarray, event_train: np.ndarray, risk_train: np.ndarray,
                    time_test: np.ndarray, event_test: np.ndarray, risk_test: np.ndarray) -> dict[str, float]:
    """The test split's C-index and pair counts, td-AUC at its median follow-up, integrated Brier score.

    Undefined figures (no event, follow-up outside the training range) are NaN, never an error.
    """
    from sksurv.linear_model.coxph import BreslowEstimator
    from sksurv.metrics import cumulative_dynamic_auc, integrated_brier_score
    from sksurv.util import Surv

    counts = pair_counts(time_test, event_test, risk_test)
    out = {C_INDEX: counts.c_index, **dict(zip(PAIRS, (counts.concordant, counts.discordant, counts.tied_risk))),
           N_EVENTS: int(np.sum(event_test)), TD_AUC: math.nan, IBS: math.nan,
           "test-loss": float(cox_loss(torch.as_tensor(risk_test), torch.as_tensor(time_test),
                                       torch.as_tensor(event_test, dtype=torch.float64), TIES))}
    train = Surv.from_arrays(np.asarray(event_train, bool), np.asarray(time_train, float))
    test = Surv.from_arrays(np.asarray(event_test, bool), np.asarray(time_test, float))
    if not (np.any(event_train) and np.any(event_test)):
        return out
    try:
        median = float(np.median(time_test))
        out[TD_AUC] = float(cumulative_dynamic_auc(train, test, risk_test, [median])[0][0])
    except ValueError as err:  # follow-up beyond the training range, no case or control at that time
        log.info("td-AUC undefined: %s", err)
    try:
        grid = np.unique(np.quantile(time_test, np.linspace(0.1, 0.8, 15)))
        baseline = BreslowEstimator().fit(np.asarray(risk_train, float), np.asarray(event_train, int),
                                          np.asarray(time_train, float))
        curves = np.vstack([fn(grid) for fn in baseline.get_survival_function(np.asarray(risk_test, float))])
        out[IBS] = float(integrated_brier_score(train, test, curves, grid))
    except ValueError as err:
        log.info("integrated Brier score undefined: %s", err)
    return out


def evaluate_survival(outputs: SiteOutputs, time_train: np.ndarray, event_train: np.ndarray,
                      time_test: np.ndarray, event_test: np.ndarray, *, min_count: int, work_dir: Path | None,
                      site: str, covariates: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
                      ) -> tuple[dict[str, float], dict[str, str]]:
    """The survival scalars this site may send, and what it withholds: (metrics, {what: code}).

    Fewer than `min_count` test images or test events: no test figure is sent
    (`test-metrics: small-count`), as for classification. The Kaplan-Meier plot of the test
    split's predicted risk groups (split at the median training risk) is drawn into
    `work_dir` either way: it shows per-patient steps and stays at the site. `covariates`
    (train, test): `site_covariates`, added to the network's risk (`risk_scores`).
    """
    risk_train = risk_scores(outputs.model, outputs("train")[0][:, 0], covariates[0])
    risk_test = risk_scores(outputs.model, outputs("test")[0][:, 0], covariates[1])
    scores = survival_scores(time_train, event_train, risk_train, time_test, event_test, risk_test)
    if work_dir is not None and len(risk_test) and len(risk_train):
        plot_risk_groups(work_dir / KM_PLOT, time_test, event_test, risk_test, float(np.median(risk_train)), site)
        (work_dir / "survival.json").write_text(json.dumps(
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scores.items()}, indent=2))
    if len(time_test) < min_count or int(np.sum(event_test)) < min_count:
        return {}, {"test-metrics": "small-count"}
    return scores, {}


def plot_risk_groups(path: Path, time: np.ndarray, event: np.ndarray, risk: np.ndarray, cut: float,
                     site: str) -> None:
    """Kaplan-Meier curves (scikit-survival) of the high- and low-risk groups, cut at the median training risk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sksurv.nonparametric import kaplan_meier_estimator

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, members in (("low risk", risk <= cut), ("high risk", risk > cut)):
        if members.any():
            steps, survival = kaplan_meier_estimator(np.asarray(event[members], bool), np.asarray(time[members], float))
            ax.step(np.r_[0.0, steps], np.r_[1.0, survival], where="post", label=f"{name} (n={int(members.sum())})")
    ax.legend(fontsize=8)
    ax.set_xlabel("days")
    ax.set_ylabel("survival")
    ax.set_title(f"{site}: test split by predicted risk")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
