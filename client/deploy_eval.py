"""The deployment evaluation set: labelled images of the population a site is deployed on, read only to score.

Label-shift correction is for the case where the images a site must read (its deployment
population, the unlabelled rows of labels.csv) have another prevalence than the images it
has labels for. Whether a correction helps can only be judged on labelled images *of that
population*, which a hospital gets later (follow-up, pathology) and which no model may
learn from. They sit in their own index, `deploy-audit.csv` (the labels.csv grammar, split
`test`), which `fedrad.client.dataset.load_site` reads only when asked for it by name: the
site's training, calibration (BCTS), EM, BBSE and personalisation never see these labels,
and the images are not in EM's pool either. Here, in the last round, the global model
scores them and each correction's posteriors are measured: ECE, Brier score and balanced
accuracy, one scalar each, plus the prior each correction used. Nothing per image leaves.

Five rows, so that every gain is measured against the baseline it must beat:
``none`` (the global model under π_train), ``labelled`` (calibrated, re-weighted to the
site's labelled prior: what a site gets without any estimate), ``em`` and ``bbse``
(calibrated, re-weighted to the estimate from its unlabelled images) and ``oracle``
(calibrated, re-weighted to the evaluation set's own prior: the best any prior can do).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrad.client.calibration import BCTS
from fedrad.client.dataset import load_site
from fedrad.client.outputs import model_outputs
from fedrad.client.reference import site_preprocessor
from fedrad.client.train import pixel_inputs
from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.labelshift import correct_posteriors, prior_from_counts
from fedrad.common.metrics import brier_score, classification_metrics
from fedrad.common.model import NUM_CLASSES

AUDIT_FILE = "deploy-audit.csv"  # in the site folder, beside labels.csv; never read as training labels
METHODS = ("none", "labelled", "em", "bbse", "oracle")


def metric_keys() -> tuple[str, ...]:
    """The scalars a site may send for its deployment evaluation (the egress whitelist lists them)."""
    per_method = (f"{what}-deploy-{m}" for m in METHODS for what in ("prior", "ece", "brier", "balanced-accuracy"))
    return ("n-deploy-eval", "prior-labelled", *per_method)


@dataclass(frozen=True)
class DeployAudit:
    """The global model's logits on the deployment evaluation images, and their labels (for scoring only)."""

    logits: np.ndarray  # (N, K)
    y: np.ndarray  # (N,)


def load_audit(model: EfficientNetLite0, cfg: RunConfig, site_dir: Path, reference: np.ndarray | None, *,
               site: str, cache_dir: Path | None, device: torch.device) -> DeployAudit | None:
    """The site's deployment evaluation set through this run's preprocessing and model; None without one.

    Rows of `deploy-audit.csv` need a label; a row without one cannot be scored and is left
    out (like an unlabelled test row in labels.csv). The images run through the whole
    network on pixels (a few hundred, once, in the last round), so they never enter the
    site's feature cache.
    """
    site_dir = Path(site_dir)
    if not (site_dir / AUDIT_FILE).is_file():
        return None
    preprocessor = site_preprocessor(cfg, site_dir, reference, site=site, cache_dir=cache_dir)
    data = load_site(site_dir, preprocessor, index=AUDIT_FILE)
    logits, _ = model_outputs(model, pixel_inputs(model, data.x_test, 1, device), device)
    return DeployAudit(logits, data.y_test)


def score_corrections(audit: DeployAudit, g_audit: np.ndarray, ref: np.ndarray, calibrate: BCTS | None,
                      priors: Mapping[str, np.ndarray | None]) -> dict[str, float]:
    """ECE, Brier and balanced accuracy of each correction on the deployment evaluation set, with its prior.

    Args:
        audit: The evaluation images' logits and labels.
        g_audit: log p_train(y|x) of those images (the global model under π_train).
        ref: π_train.
        calibrate: The site's BCTS map (fitted on its test split); None where it could not
            calibrate (then the prior corrections re-weight the uncalibrated posteriors).
        priors: The prior of `labelled`, `em` and `bbse` (None or absent: that row is not scored).

    The oracle prior is the evaluation set's own P(y): the labels are used here, for the
    reference row, and nowhere else.
    """
    y = np.asarray(audit.y, dtype=int)
    out: dict[str, float] = {"n-deploy-eval": len(y)}
    if len(y) == 0:
        return out
    q = np.exp(g_audit) if calibrate is None else calibrate(g_audit)
    used = {"none": ref, **priors, "oracle": prior_from_counts(np.bincount(y, minlength=NUM_CLASSES))}
    for method in METHODS:
        prior = used.get(method)
        if prior is None:
            continue
        probs = np.exp(g_audit) if method == "none" else correct_posteriors(q, prior, ref)
        m = classification_metrics(y, probs[:, 1])
        out.update({f"prior-deploy-{method}": float(prior[1]), f"ece-deploy-{method}": m["ece"],
                    f"brier-deploy-{method}": brier_score(y, probs[:, 1]),
                    f"balanced-accuracy-deploy-{method}": m["balanced-accuracy"]})
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}
