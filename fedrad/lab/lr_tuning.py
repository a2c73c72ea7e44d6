"""Each strategy's `lr-max` chosen on a validation split carved from the sites' training rows, never the test split.

Why: a strategy compared at a learning rate tuned for another is handicapped, and the
comparison then measures the rate, not the strategy (full fine-tuning at lr-decay 0.5
trained its stem at 1e-8). So `fedrad compare` first runs every strategy at each rate of a
small grid on a *tuning copy* of the data: each site's labelled training rows split into
training (75 %) and validation (25 %, stratified by class, chosen by a stable hash of the
image path), the site's real test rows and its deployment evaluation set left out. The
validation rows play the test split's part in that copy, so the tuning runs are ordinary
runs: the rate with the best mean validation AUC over sites wins (the smaller rate on a
tie), and the real runs use it. The copy links to the site's files; it writes only new
labels.csv files.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.client.deploy_eval import AUDIT_FILE
from fedrad.common.sites import discover_sites

LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
VALIDATION_FRACTION = 0.25
MIN_VALIDATION_PER_CLASS = 2  # a class with at least 4 training rows gives this many to validation


def carve_validation(data_dir: Path, out: Path, *, seed: int, fraction: float = VALIDATION_FRACTION) -> Path:
    """Write the tuning copy of `data_dir` under `out` (one folder per site) and return `out`.

    Per site: labels.csv's labelled `train` rows become `train` or `test` (validation);
    unlabelled rows stay; the original `test` rows and `deploy-audit.csv` are left out.
    Every other entry of the site folder is a symbolic link to the original.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1); got {fraction}.")
    out = Path(out)
    for site in discover_sites(Path(data_dir)):
        dst = out / site.name
        dst.mkdir(parents=True, exist_ok=True)
        for entry in site.iterdir():
            link = dst / entry.name
            if entry.name not in ("labels.csv", AUDIT_FILE) and not os.path.lexists(link):
                link.symlink_to(entry.resolve())
        with open(site / "labels.csv", encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
        header = [h.strip().lower() for h in rows[0]]
        missing = [c for c in ("image", "label", "split") if c not in header]
        if missing:
            raise ValueError(f"{site / 'labels.csv'}: missing column(s) {missing}; cannot carve a validation split.")
        image, label, split = (header.index(c) for c in ("image", "label", "split"))

        def cell(row: list[str], i: int) -> str:
            return row[i].strip() if i < len(row) else ""

        body = [r for r in rows[1:] if any(c.strip() for c in r) and cell(r, split).lower() != "test"]
        for c in sorted({cell(r, label) for r in body if cell(r, label)}):
            members = [r for r in body if cell(r, label) == c]
            k = round(fraction * len(members))
            k = max(k, MIN_VALIDATION_PER_CLASS) if len(members) >= 2 * MIN_VALIDATION_PER_CLASS else k
            rank = sorted(members, key=lambda r: hashlib.sha256(f"{seed}:{cell(r, image)}".encode()).hexdigest())
            for r in rank[:k]:
                r[split] = "test"
        with open(dst / "labels.csv", "w", encoding="utf-8", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows([rows[0], *body])
    return out


def validation_auc(result: Mapping[str, Any]) -> float:
    """Mean AUC over the sites of one tuning run (NaN when no site has one)."""
    aucs = [s["auc"] for s in result["sites"] if s.get("auc") is not None and math.isfinite(s["auc"])]
    return float(np.mean(aucs)) if aucs else math.nan


def choose_lr(scores: Mapping[float, float]) -> float:
    """The rate with the best validation score; the smallest such rate on a tie; refuses when none scored."""
    ok = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    if not ok:
        raise ValueError(f"no tuning run gave a validation AUC (rates tried: {sorted(scores)}).")
    best = max(ok.values())
    return min(lr for lr, s in ok.items() if s == best)


def parse_grid(text: str) -> tuple[float, ...]:
    """'3e-4,1e-3' -> (0.0003, 0.001); refuses empty, non-numeric or non-positive rates by value."""
    try:
        grid = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--lr-grid must be comma-separated numbers, e.g. 3e-4,1e-3; got {text!r}.") from None
    if not grid or any(not (v > 0 and math.isfinite(v)) for v in grid):
        raise ValueError(f"--lr-grid needs at least one positive rate; got {text!r}.")
    return grid


def tuning_summary(grid: Sequence[float], scores: Mapping[str, Mapping[float, float]],
                   chosen: Mapping[str, float]) -> dict[str, Any]:
    """compare.json's "lr_tuning": per strategy the grid, each rate's validation AUC, the chosen rate."""
    def clean(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else round(v, 4)

    return {name: {"grid": list(grid), "validation_auc": [clean(scores[name].get(lr)) for lr in grid],
                   "lr_chosen": chosen[name]} for name in chosen}


def rates_from(compare_json: Path, strategies: Sequence[str]) -> dict[str, float]:
    """The lr-max an earlier compare chose per strategy (its compare.json's "lr_tuning"), for `--lr-from`.

    Why: tuning is most of a compare's time; a second draw of the data can reuse the rates
    chosen on the first one's validation split (still never on a test split). Refuses a file
    without tuning, or one that lacks a strategy asked for, by name.
    """
    import json

    try:
        tuning = json.loads(Path(compare_json).read_text())["lr_tuning"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--lr-from {compare_json}: not a compare.json with an lr_tuning section ({err})") from None
    tuning = tuning.get("lr_from", tuning)  # itself made with --lr-from: the rates it used
    rates = {name: float(v["lr_chosen"] if isinstance(v, dict) else v) for name, v in tuning.items()}
    missing = [name for name in strategies if name not in rates]
    if missing:
        raise ValueError(f"--lr-from {compare_json}: no tuned lr-max for {missing}; it has {sorted(rates)}")
    return {name: rates[name] for name in strategies}
