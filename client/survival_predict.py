"""`fedrad predict` / `evaluate` for a `task = survival` run: each patient's risk, kept at the site.

The site's model is assembled as for classification (`fedrad.client.site_model.assemble`: the
shared layers, the site's own BatchNorm); its output is a log hazard ratio, plus beta . z where the
run had mask `covariates` (`fedrad.client.survival_site.risk_scores`). The folder is read like a
training site with the run's survival target: a row with `time` and `event` lands in its split, a
row without them is scored as a new patient (split `train`, no time).

Written to `--out` only: `predictions.csv` (per image: its risk and risk group), `skipped.csv`,
`model-card.json`; `evaluate` adds `evaluate.json` / `evaluate.md` (Harrell's C-index, td-AUC at
the median follow-up, integrated Brier score: `fedrad.client.survival_site.survival_scores`, the
Breslow baseline from the folder's training rows) and `km-risk-groups.png`. The risk group is
"high" above the median risk of the folder's training rows with a time (the cut the run's own
Kaplan-Meier plot uses); without such rows there is no cut and the column is empty. Nothing is sent.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.client.predict import SiteFolder, split_indices, write_skipped
from fedrad.client.site_model import SiteModel
from fedrad.client.survival_site import plot_risk_groups, risk_scores, survival_scores
from fedrad.common.covariates import select
from fedrad.common.records import C_INDEX, IBS, PAIRS, TD_AUC

COLUMNS = ("image", "split", "time", "event", "risk", "risk_group", "model_sha256")


@dataclass
class ScoredRisks:
    """A folder's images scored by a survival model: per image its path, split, time (NaN: none), event (-1)."""

    images: list[str]
    splits: list[str]
    time: np.ndarray
    event: np.ndarray
    risk: np.ndarray
    cut: float  # median risk of the folder's training rows with a time (NaN: none)
    skipped: list

    def subset(self, split: str) -> np.ndarray:
        """Indices of images in `split` ("train" includes rows without a time, "all" = every image)."""
        return split_indices(self.splits, split)

    def only(self, split: str, name: str = "site") -> ScoredRisks:
        """The images of `split` (the cut stays the training rows'); refused when there are none."""
        keep = self.subset(split)
        if not len(keep):
            raise ValueError(f"{name}: no readable image in split {split!r} ({len(self.skipped)} skipped, see "
                             "skipped.csv); nothing to score.")
        return ScoredRisks([self.images[i] for i in keep], [self.splits[i] for i in keep], self.time[keep],
                           self.event[keep], self.risk[keep], self.cut, self.skipped)


def score_risks(site: SiteModel, folder: SiteFolder) -> ScoredRisks:
    """Every readable image's risk, in the folder's order (`.only(split)` for one split); the training rows
    with a time give the risk-group cut."""
    data = folder.data
    names = site.cfg.covariate_names
    buckets = {"train": (data.x_train, data.time_train, data.y_train, data.covariates_train),
               "test": (data.x_test, data.time_test, data.y_test, data.covariates_test),
               "unlabelled": (data.x_unlabelled, np.full(len(data.x_unlabelled), np.nan),
                              np.full(len(data.x_unlabelled), -1), data.covariates_unlabelled)}
    risks, times, events = [], [], []
    for bucket, (x, time, event, z) in buckets.items():
        logits, _ = site.outputs(x)
        covariates = select(z, names, site=data.name) if names and len(x) else None
        risks.append(risk_scores(site.model, logits[:, 0], covariates) if len(x) else np.zeros(0))
        times.append(np.asarray(time, np.float64).reshape(-1))
        events.append(np.asarray(event, np.int64).reshape(-1))
    cut = float(np.median(risks[0])) if len(risks[0]) else math.nan
    return ScoredRisks(list(folder.paths), list(folder.splits), np.concatenate(times), np.concatenate(events),
                       np.concatenate(risks), cut, data.skipped)


def risk_group(risk: float, cut: float) -> str:
    return "" if math.isnan(cut) else "high" if risk > cut else "low"


def write_risks(out: Path, scored: ScoredRisks, *, model_sha256: str) -> Path:
    """predictions.csv (one row per scored image) and skipped.csv in `out`; returns the predictions path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for i, image in enumerate(scored.images):
            writer.writerow([image, scored.splits[i], "" if math.isnan(scored.time[i]) else f"{scored.time[i]:g}",
                             "" if scored.event[i] < 0 else int(scored.event[i]), f"{scored.risk[i]:.9g}",
                             risk_group(float(scored.risk[i]), scored.cut), model_sha256])
    write_skipped(out, scored.skipped)
    return path


def evaluate_risks(everything: ScoredRisks, split: str) -> dict[str, Any]:
    """Survival scores of `split`'s rows with a time; the Breslow baseline from the training rows with one."""
    timed = ~np.isnan(everything.time)
    train = [i for i in everything.subset("train") if timed[i]]
    rows = [i for i in everything.subset(split) if timed[i]]
    if not rows:
        raise ValueError(f"no image in split {split!r} has a time and an event; evaluate needs them "
                         "(predict scores patients without).")
    t, e, r = everything.time, everything.event, everything.risk
    scores = survival_scores(t[train], e[train], r[train], t[rows], e[rows], r[rows])
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in scores.items()}
    return {"split": split, "n_images": len(rows), "n_events": int(np.sum(e[rows])),
            "c_index": finite[C_INDEX], "td_auc": finite[TD_AUC],
            "pairs": dict(zip(("concordant", "discordant", "tied_risk"), (finite[k] for k in PAIRS))),
            "integrated_brier": finite[IBS], "risk_group_cut": None if math.isnan(everything.cut) else everything.cut}


def write_survival_evaluation(out: Path, result: dict[str, Any], card: dict[str, Any], scored: ScoredRisks,
                              split: str) -> None:
    """evaluate.json, evaluate.md and the Kaplan-Meier plot of `split`'s risk groups, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.json").write_text(json.dumps(result, indent=2))
    cell = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731 - one cell format
    (out / "evaluate.md").write_text("\n".join([
        f"# {card.get('site') or 'site'}: survival model on split {split}", "",
        f"run {card['run_id']}, model {card['model_sha256'][:12]}, BatchNorm: {card['batchnorm']}", "",
        "| images (events) | C-index | td-AUC (median follow-up) | integrated Brier |", "|---:|---:|---:|---:|",
        f"| {result['n_images']} ({result['n_events']}) | {cell(result['c_index'])} | {cell(result['td_auc'])} | "
        f"{cell(result['integrated_brier'])} |", ""]))
    rows = [i for i in scored.subset(split) if not math.isnan(scored.time[i])]
    if rows and not math.isnan(scored.cut):
        plot_risk_groups(out / "km-risk-groups.png", scored.time[rows], scored.event[rows], scored.risk[rows],
                         scored.cut, card.get("site") or "site")


def survival_card(base: dict[str, Any], site: SiteModel) -> dict[str, Any]:
    """The model card of a survival model: the classification card's provenance, a survival head's outputs."""
    names = site.cfg.covariate_names
    head = getattr(site.model, "_covariates", None)
    card = {k: v for k, v in base.items() if k not in ("outputs", "calibration", "prior", "prior_train",
                                                       "logit_adjust", "personalised_head", "decision")}
    return {**card, "task": "survival", "outputs": {
        "risk": "log hazard ratio of the Cox head (higher = earlier event)"
                + (": w . features + b + beta . z, z the mask covariates" if names else ""),
        "risk_group": "high above the median risk of the folder's training rows with a time (empty without)"},
        "covariates": {"names": list(names),
                       "beta": [] if head is None else [float(b) for b in head.weight.detach().cpu().reshape(-1)]}}
