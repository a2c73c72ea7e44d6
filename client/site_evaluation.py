"""`fedrad evaluate` at a site: how good its model is on a labelled folder, with uncertainty.

AUC with a 95 % bootstrap interval that resamples *patients* (labels.csv's optional `patient`
column; an image without one is its own patient), so several images of one patient do not
count as independent evidence. Beside it: ECE and Brier score of the uncorrected and corrected
probabilities, a reliability diagram of both (PNG), sensitivity, specificity and the
confusion matrix of the decision at the threshold. Metrics come from scikit-learn
(`roc_auc_score`, `confusion_matrix`, `calibration_curve`) and `fedrad.common.metrics` (ECE as
the run reports it). All of it stays in `--out`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, roc_auc_score

from fedrad.common.metrics import brier_score, expected_calibration_error

N_BOOTSTRAP = 2000


def patient_bootstrap_auc(y: np.ndarray, p: np.ndarray, patients: list[str], *, n_boot: int = N_BOOTSTRAP,
                          seed: int = 0) -> tuple[float, float] | None:
    """Percentile 95 % interval of the AUC over patient resamples; None when a class is absent."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    if np.unique(y).size < 2:
        return None
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(patients):
        groups.setdefault(pid, []).append(i)
    members = list(groups.values())
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        if np.unique(y[idx]).size == 2:  # a resample with one class has no AUC: drawn again by the next round
            aucs.append(roc_auc_score(y[idx], p[idx]))
    if not aucs:
        return None
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


def evaluate_scores(y: np.ndarray, probabilities: dict[str, np.ndarray], decision: np.ndarray,
                    patients: list[str], *, threshold: float, decision_on: str) -> dict[str, Any]:
    """The evaluation figures (JSON-ready) of labelled images `y`."""
    y = np.asarray(y, dtype=int)
    p, q = probabilities["probability"], probabilities["probability_corrected"]
    two = np.unique(y).size == 2
    tn, fp, fn, tp = confusion_matrix(y, decision.astype(int), labels=[0, 1]).ravel()
    ci = patient_bootstrap_auc(y, p, patients)
    personal = probabilities.get("probability_personalised")
    has_personal = personal is not None and not np.all(np.isnan(personal))
    return {
        "n_images": int(len(y)), "n_patients": len(set(patients)), "n_malignant": int(y.sum()),
        "auc": float(roc_auc_score(y, p)) if two else None,
        "auc_ci95": None if ci is None else list(ci),
        "auc_ci_method": f"percentile bootstrap over patients, {N_BOOTSTRAP} resamples",
        "auc_corrected": float(roc_auc_score(y, q)) if two else None,
        "auc_personalised": float(roc_auc_score(y, personal)) if two and has_personal else None,
        "ece": expected_calibration_error(y, q), "ece_uncorrected": expected_calibration_error(y, p),
        "brier": brier_score(y, q), "brier_uncorrected": brier_score(y, p),
        "threshold": threshold, "decision_on": decision_on,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def reliability_diagram(y: np.ndarray, probabilities: dict[str, np.ndarray], path: Path, *, title: str) -> Path:
    """Observed frequency of malignancy against predicted probability, uncorrected and corrected (10 bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, label in (("probability", "uncorrected"), ("probability_corrected", "corrected")):
        frac, mean = calibration_curve(y, probabilities[name], n_bins=10, strategy="uniform")
        ax.plot(mean, frac, marker="o", label=f"{label} (ECE {expected_calibration_error(y, probabilities[name]):.3f})")
    ax.set_xlabel("predicted P(malignant)")
    ax.set_ylabel("observed fraction malignant")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def to_markdown(result: dict[str, Any], card: dict[str, Any]) -> str:
    ci = result["auc_ci95"]
    cm = result["confusion_matrix"]
    return "\n".join([
        f"# fedrad evaluate · {card.get('site') or 'site'} · split {result['split']}", "",
        f"Model: run {card['run_id']} (round {card['rounds']}, {card['strategy']}), BatchNorm: {card['batchnorm']}.", "",
        "| figure | value |", "|---|---:|",
        f"| images / patients / malignant | {result['n_images']} / {result['n_patients']} / {result['n_malignant']} |",
        f"| AUC (95 % CI, patient bootstrap) | {_fmt(result['auc'])} "
        f"({'–' if ci is None else f'{ci[0]:.3f}–{ci[1]:.3f}'}) |",
        f"| AUC personalised head | {_fmt(result['auc_personalised'])} |",
        f"| ECE uncorrected → corrected | {_fmt(result['ece_uncorrected'])} → {_fmt(result['ece'])} |",
        f"| Brier uncorrected → corrected | {_fmt(result['brier_uncorrected'])} → {_fmt(result['brier'])} |",
        f"| sensitivity / specificity at {result['threshold']} ({result['decision_on']}) | "
        f"{_fmt(result['sensitivity'])} / {_fmt(result['specificity'])} |", "",
        "| | predicted benign | predicted malignant |", "|---|---:|---:|",
        f"| benign | {cm['tn']} | {cm['fp']} |", f"| malignant | {cm['fn']} | {cm['tp']} |", "",
        "![reliability diagram](reliability.png)", ""])


def write_evaluation(out: Path, result: dict[str, Any], card: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "evaluate.json"
    path.write_text(json.dumps(result, indent=2))
    (out / "evaluate.md").write_text(to_markdown(result, card))
    return path
