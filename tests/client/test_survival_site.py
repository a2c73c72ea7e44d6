"""Survival rows in labels.csv and the site's survival scores (scikit-survival / lifelines references)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lifelines.utils import concordance_index

from fedrad.client.labels import Skipped, read_labels
from fedrad.client.survival_site import survival_scores
from fedrad.common.records import EVAL_METRICS, SURVIVAL_METRICS


def test_time_and_event_rows_and_bad_values_are_skipped_with_reasons(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text(
        "image,split,time,event\n"
        "a.dcm,train,120.5,1\n"
        "b.dcm,test,30,0\n"
        "c.dcm,train,-3,1\n"
        "d.dcm,test,40,2\n"
        "e.dcm,train,50,\n"
        "f.dcm,test,,\n"
        "g.dcm,train,,\n")
    skipped: list[Skipped] = []
    rows = read_labels(tmp_path / "labels.csv", skipped)
    assert [(r.image, r.time, r.event, r.label) for r in rows] == [("a.dcm", 120.5, 1, None), ("b.dcm", 30.0, 0, None),
                                                                    ("g.dcm", None, None, None)]
    reasons = " | ".join(s.reason for s in skipped)
    assert "line 4 (c.dcm): time must be a number of days > 0, got '-3'" in reasons
    assert "line 5 (d.dcm): event must be 1 (event) or 0 (censored), got '2'" in reasons
    assert "line 6 (e.dcm): event must be" in reasons
    assert "line 7 (f.dcm): test row has no label" in reasons and len(skipped) == 4


def test_a_csv_without_label_or_survival_columns_names_them(tmp_path: Path) -> None:
    from fedrad.client.labels import SiteDataError

    (tmp_path / "labels.csv").write_text("image,split,time\na.dcm,train,3\n")
    with pytest.raises(SiteDataError, match=r"missing required column\(s\) label \(or time and event\)"):
        read_labels(tmp_path / "labels.csv", [])


def test_scores_match_references_and_only_scalars_leave() -> None:
    rng = np.random.default_rng(0)
    n = 120
    eta = rng.normal(size=n)
    t_event = rng.weibull(1.5, n) * 900 * np.exp(-eta / 1.5)
    t_cens = rng.exponential(1500, n)
    time, event = np.minimum(t_event, t_cens) + 1, (t_event <= t_cens).astype(int)
    train, test = slice(0, 70), slice(70, n)
    risk = eta + rng.normal(0, 0.5, n)
    out = survival_scores(time[train], event[train], risk[train], time[test], event[test], risk[test])
    assert out["c-index"] == pytest.approx(concordance_index(time[test], -risk[test], event[test]), abs=1e-9)
    assert out["pairs-concordant"] + out["pairs-discordant"] + out["pairs-tied-risk"] > 0
    assert 0.5 < out["td-auc"] <= 1.0 and 0.0 < out["integrated-brier"] < 0.25
    shuffled = survival_scores(time[train], event[train], risk[train], time[test], event[test],
                               rng.permutation(risk[test]))
    assert shuffled["c-index"] < out["c-index"] and shuffled["integrated-brier"] > out["integrated-brier"]
    assert set(out) <= set(EVAL_METRICS) and set(SURVIVAL_METRICS) <= set(out)
    assert all(np.ndim(v) == 0 for v in out.values())
