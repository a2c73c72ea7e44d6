"""The coordinator's side of label-shift correction: the training prior out, the sites' figures in the report.

The training prior π_train is the class distribution of every image the federation
trained on, formed from the per-class counts each site reports with its update (counts
are aggregates; no label travels). It goes to every site with each evaluation, as the
reference its posteriors and corrections are expressed against.

Per site the report shows what the site measured in the last round (`fedrad.client.site_shift`):
the estimated priors, ECE / Brier / balanced accuracy before and after correction, global
vs personalised AUC and the concept-shift flag (with a 95 % interval of the disagreement
rate behind it), with the site's fallback reasons turned
into sentences (`fedrad.common.shift_flags`). In simulation the lab hands over the
generator's truth (the coordinator never reads generator files), and the true prior is
P(malignant) among the site's unlabelled images (what its EM estimate is measured
against), or among all its images when it has none.

Where a site has a deployment evaluation set (labelled images of the population it is
deployed on, `fedrad.client.deploy_eval`), the report adds its scores for each correction
side by side: none, the labelled prior, EM, BBSE and the oracle prior, each with the prior
it used (`prior_deploy_<method>`, `ece_deploy_<method>`, `brier_deploy_<method>`,
`balanced_accuracy_deploy_<method>`), beside `prior_labelled` and `prior_deploy_true`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy.stats import binomtest

from fedrad.common.labelshift import prior_from_counts
from fedrad.common.records import CLASS_COUNTS
from fedrad.common.shift_flags import describe

# report.json key <- site metric key
REPORT_KEYS = {
    "prior_em": "prior-em", "prior_bbse": "prior-bbse", "prior_site": "prior-site", "n_unlabelled": "n-unlabelled",
    "bcts_temperature": "bcts-temperature", "bcts_bias": "bcts-bias",
    "ece_uncorrected": "ece-uncorrected", "ece_corrected": "ece-corrected", "ece_floor": "ece-floor",
    "brier_uncorrected": "brier-uncorrected", "brier_corrected": "brier-corrected",
    "balanced_accuracy_uncorrected": "balanced-accuracy-uncorrected",
    "balanced_accuracy_corrected": "balanced-accuracy-corrected",
    "auc_personalised": "auc-personalised", "disagreement": "disagreement",
    "prior_labelled": "prior-labelled", "n_deploy_eval": "n-deploy-eval",
}
DEPLOY_METHODS = ("none", "labelled", "em", "bbse", "oracle")  # rows of the deployment evaluation
DEPLOY_KEYS = {f"{what.replace('-', '_')}_deploy_{m}": f"{what}-deploy-{m}"
               for m in DEPLOY_METHODS for what in ("prior", "ece", "brier", "balanced-accuracy")}


def training_prior(train_metrics: Iterable[Mapping[str, float]]) -> np.ndarray | None:
    """π_train from each site's latest reported class counts; None when no site reported any."""
    rows = [m for m in train_metrics if all(k in m for k in CLASS_COUNTS)]
    counts = np.sum([[float(m[k]) for k in CLASS_COUNTS] for m in rows], axis=0) if rows else None
    if counts is None or counts.sum() <= 0:
        return None
    return prior_from_counts(counts, smoothing=1.0)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def disagreement_interval(rate: float | None, n_test: float | None) -> list[float] | None:
    """Wilson 95 % interval [low, high] of a disagreement rate measured on `n_test` test images.

    Why: the concept-shift flag compares one rate with a threshold, and on the 80-200 test
    images a site typically has, a rate near 0.15 has a standard error of 0.025-0.04. The
    interval tells a reader whether a flag (or its absence) is clear-cut or marginal. The
    count is recovered from the rate (the site sends the rate, not per-image decisions).
    """
    if rate is None or not n_test or n_test < 1:
        return None
    n = int(round(n_test))
    interval = binomtest(int(round(rate * n)), n).proportion_ci(0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def site_fields(name: str, last_eval: Mapping[str, float], truth: Mapping[str, Any] | None) -> dict[str, Any]:
    """The label-shift keys of one site's row in report.json (null where the site measured nothing)."""
    truth = truth or {}
    unlabelled = truth.get("prior_unlabelled_true")
    fields: dict[str, Any] = {"prior_true": _finite(truth.get("prior_true") if unlabelled is None else unlabelled)}
    # the deployment population's true P(malignant) (simulation truth; null for real data or a site without one)
    fields["prior_deploy_true"] = _finite(truth.get("prior_deploy_true"))
    fields.update({key: _finite(last_eval.get(metric)) for key, metric in {**REPORT_KEYS, **DEPLOY_KEYS}.items()})
    fields["disagreement_ci95"] = disagreement_interval(fields["disagreement"], _finite(last_eval.get("num-examples")))
    concept = last_eval.get("concept-shift")
    fields["concept_shift"] = None if concept is None else bool(concept)
    fields["label_shift_warnings"] = describe(int(last_eval.get("label-shift-flags", 0)), name)
    return fields


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


DEPLOY_LABELS = {"none": "none (global model, π_train)", "labelled": "labelled prior", "em": "EM", "bbse": "BBSE",
                 "oracle": "oracle prior"}


def deploy_section(sites: list[Mapping[str, Any]]) -> list[str]:
    """One row per site and correction on the deployment evaluation set (empty when no site has one)."""
    scored = [s for s in sites if s.get("n_deploy_eval")]
    if not scored:
        return []
    lines = ["", "### On the deployment evaluation set", "",
             "Labelled images of the population each site is deployed on, read by the site only to score (never "
             "to train, calibrate or estimate). Every correction except none is BCTS-calibrated on the site's "
             "test split and re-weighted to the prior in its row; the oracle uses the evaluation set's own prior.",
             "", "| site | n eval | prior labelled | prior deploy (true) | correction | prior used | ECE | Brier | "
                 "bal. acc. |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for s in scored:
        for m in DEPLOY_METHODS:
            lines.append(f"| {s['name']} | {s['n_deploy_eval']:.0f} | {_fmt(s.get('prior_labelled'))} | "
                         f"{_fmt(s.get('prior_deploy_true'))} | {DEPLOY_LABELS[m]} | "
                         f"{_fmt(s.get(f'prior_deploy_{m}'))} | {_fmt(s.get(f'ece_deploy_{m}'))} | "
                         f"{_fmt(s.get(f'brier_deploy_{m}'))} | {_fmt(s.get(f'balanced_accuracy_deploy_{m}'))} |")
    return lines


def _interval(bounds: list[float] | None) -> str:
    return "" if not bounds else f" [{bounds[0]:.2f}, {bounds[1]:.2f}]"


def markdown_section(report: Mapping[str, Any]) -> list[str]:
    """The report.md section: one row per site, then the concept-shift flags and fallback warnings."""
    sites = [s for s in report["sites"] if s.get("ece_uncorrected") is not None or s.get("label_shift_warnings")]
    if not sites:
        return []
    prior = report.get("prior_train")
    lines = ["", "## Label shift and concept shift (last round)", "",
             f"Training prior P(malignant) = {_fmt(prior)} (from the sites' labelled counts). EM and BBSE estimate "
             "P(malignant) among a site's unlabelled images (true: simulation truth); the prior used is EM's, or "
             "the labelled prior where a site has too few unlabelled images. Before → after: the global model's "
             "posteriors vs calibrated and prior-corrected ones, on the test split (cross-fitted). Balanced "
             "accuracy at threshold 0.5 may fall after correction at a skewed prior: Bayes decisions maximise "
             "accuracy, not balanced accuracy. ECE floor: the ECE perfectly calibrated posteriors would score on "
             "this many test images (ECE is biased upward on small splits); an ECE near it is as good as "
             "this split can tell. Disagreement: the share of test images on which the personalised decision "
             "layer and the federation's reading disagree, with its Wilson 95 % interval.", "",
             "| site | n unlabelled | prior true | EM | BBSE | prior used | ECE before → after (floor) | "
             "Brier before → after | bal. acc. before → after | AUC global | AUC personalised | disagreement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sites:
        flag = " ⚑" if s.get("concept_shift") else ""
        lines.append(f"| {s['name']} | {s.get('n_unlabelled') or 0:.0f} | {_fmt(s.get('prior_true'))} | "
                     f"{_fmt(s.get('prior_em'))} | {_fmt(s.get('prior_bbse'))} | {_fmt(s.get('prior_site'))} | "
                     f"{_fmt(s.get('ece_uncorrected'))} → {_fmt(s.get('ece_corrected'))} ({_fmt(s.get('ece_floor'))}) | "
                     f"{_fmt(s.get('brier_uncorrected'))} → {_fmt(s.get('brier_corrected'))} | "
                     f"{_fmt(s.get('balanced_accuracy_uncorrected'))} → {_fmt(s.get('balanced_accuracy_corrected'))} | "
                     f"{_fmt(s.get('auc'))} | {_fmt(s.get('auc_personalised'))} | "
                     f"{_fmt(s.get('disagreement'))}{_interval(s.get('disagreement_ci95'))}{flag} |")
    lines += deploy_section(sites)
    flagged = [s["name"] for s in sites if s.get("concept_shift")]
    if flagged:
        lines += ["", f"⚑ Concept shift suspected at {', '.join(flagged)}: the site's personalised decision layer "
                  "(fitted on its own labels) disagrees on at least the disagreement-threshold of its test images "
                  "with the federation's reading of its images (the global model at the prior it infers from "
                  "them): its labels follow another rule, P(Y|X) differs. Prior correction cannot fix that; the "
                  "personalised head, kept at the site, can."]
    warnings = [w for s in sites for w in s.get("label_shift_warnings", [])]
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]
    return lines
