"""Per-site test metrics: AUC, balanced accuracy, expected calibration error, Brier score.

AUC and balanced accuracy come from scikit-learn. ECE is the top-label version of
Guo et al. 2017 (equal-width confidence bins, weighted |accuracy - confidence|), which
sklearn does not provide. Undefined values (AUC with one class present) are NaN, never a crash.

ECE measured on a finite test split is biased upward: even perfectly calibrated posteriors
score above zero, because each bin's accuracy is a noisy count (Kumar et al. 2019, Roelofs
et al. 2022). `ece_noise_floor` gives that floor for the posteriors at hand, so a reader can
tell a real calibration gain from one the estimator cannot resolve.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score


def expected_calibration_error(y_true: np.ndarray, p_pos: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE of binary predictions `p_pos` = P(y=1 | x)."""
    y_true = np.asarray(y_true)
    p_pos = np.asarray(p_pos, dtype=np.float64)
    if y_true.size == 0:
        return float("nan")
    pred = (p_pos >= 0.5).astype(int)
    conf = np.where(pred == 1, p_pos, 1.0 - p_pos)
    correct = (pred == y_true).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def ece_noise_floor(p_pos: np.ndarray, n_draws: int = 300, seed: int = 0) -> float:
    """Mean ECE of perfectly calibrated posteriors `p_pos` on this many images.

    Labels are drawn from the posteriors themselves (y ~ Bernoulli(p)), so the posteriors are
    calibrated by construction; whatever ECE they still score is estimation noise. An ECE
    near this value cannot be told apart from perfect calibration at this test size. NaN
    when empty.
    """
    p_pos = np.clip(np.asarray(p_pos, dtype=np.float64), 0.0, 1.0)
    if p_pos.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([expected_calibration_error(rng.random(p_pos.size) < p_pos, p_pos)
                          for _ in range(n_draws)]))


def brier_score(y_true: np.ndarray, p_pos: np.ndarray) -> float:
    """Mean squared error of P(y=1 | x) against the 0/1 label (binary Brier score); NaN when empty."""
    y_true = np.asarray(y_true, dtype=np.float64)
    p_pos = np.asarray(p_pos, dtype=np.float64)
    return float(np.mean((p_pos - y_true) ** 2)) if y_true.size else float("nan")


def classification_metrics(y_true: np.ndarray, p_pos: np.ndarray) -> dict[str, float]:
    """AUC, balanced accuracy (threshold 0.5), ECE and log loss of one site's test split."""
    y_true = np.asarray(y_true)
    p_pos = np.asarray(p_pos, dtype=np.float64)
    two_classes = np.unique(y_true).size == 2
    return {
        "auc": float(roc_auc_score(y_true, p_pos)) if two_classes else float("nan"),
        "balanced-accuracy": float(balanced_accuracy_score(y_true, p_pos >= 0.5)) if y_true.size else float("nan"),
        "ece": expected_calibration_error(y_true, p_pos),
        "test-loss": float(log_loss(y_true, np.clip(p_pos, 1e-7, 1 - 1e-7), labels=[0, 1])) if y_true.size else float("nan"),
    }


RELIABILITY_BINS = 10


def reliability_bins(y_true: np.ndarray, p_pos: np.ndarray, n_bins: int = RELIABILITY_BINS
                     ) -> list[tuple[int, float, float]]:
    """Per equal-width bin of P(positive): (images, mean predicted P, observed fraction positive).

    The aggregate a reliability diagram is drawn from (the same numbers as scikit-learn's
    `calibration_curve`, plus the count, which a site needs for its small-count rule). An
    empty bin is (0, nan, nan).
    """
    y_true, p_pos = np.asarray(y_true, dtype=float), np.asarray(p_pos, dtype=float)
    bins = np.minimum((p_pos * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        mask = bins == b
        n = int(mask.sum())
        out.append((n, float(p_pos[mask].mean()) if n else math.nan, float(y_true[mask].mean()) if n else math.nan))
    return out
