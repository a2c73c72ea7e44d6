"""Per-site test metrics: AUC, balanced accuracy, expected calibration error, Brier score.

AUC and balanced accuracy come from scikit-learn. ECE is the top-label version of
Guo et al. 2017 (equal-width confidence bins, weighted |accuracy - confidence|), which
sklearn does not provide. Undefined values (AUC with one class present) are NaN, never a crash.
"""

from __future__ import annotations

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
