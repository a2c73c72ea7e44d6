"""The report says what the sites withheld, and the epsilon of a run with differential privacy."""

import json

import pytest

from fedrad.common.config import RunConfig
from fedrad.common.dp import epsilon
from fedrad.server.report import build_report, to_markdown
from fedrad.server.strategy import SiteLog

ARGS = dict(wall_seconds=1.0, full_model_bytes=10, shared_payload_bytes=5, rejected=[], failed=[])


def sites():
    small = SiteLog("small", train={1: {"n-train": 9}, 2: {"n-train": 9}}, evaluate={2: {"num-examples": 5}},
                    withheld={1: {"test-metrics": "small-count"}, 2: {"test-metrics": "small-count",
                                                                       "bn-stats": "policy-refused"}})
    big = SiteLog("big", train={1: {"n-train": 90}, 2: {"n-train": 90}}, evaluate={2: {"auc": 0.8}})
    return {"small": small, "big": big}


def test_the_report_lists_what_each_site_withheld_and_why():
    report = build_report(RunConfig(), sites(), **ARGS)
    rows = {s["name"]: s for s in report["sites"]}
    assert rows["small"]["withheld"] == {"test-metrics": "small-count", "bn-stats": "policy-refused"}
    assert rows["small"]["auc"] is None and rows["big"]["withheld"] == {}
    text = to_markdown(report)
    assert "## Withheld by the sites" in text and "- small: bn-stats (policy-refused), test-metrics (small-count)" in text
    assert "dp_epsilon" not in report


def test_with_dp_the_report_states_epsilon_at_delta_over_the_rounds_trained():
    cfg = RunConfig(dp_clip=1.0, dp_noise=1.5, dp_delta=1e-6)
    report = build_report(cfg, sites(), **ARGS)
    assert report["dp_rounds"] == 2 and report["dp_epsilon"] == pytest.approx(epsilon(1.5, 2, 1e-6))
    assert json.loads(json.dumps(report, allow_nan=False))["dp_epsilon"] > 0
    assert f"epsilon {report['dp_epsilon']:.3f}" in to_markdown(report)
    no_noise = build_report(cfg.replace(dp_noise=0.0), sites(), **ARGS)
    assert no_noise["dp_epsilon"] is None  # clipping alone is no guarantee: null, not infinity


def test_the_report_keeps_the_sites_reliability_bins_and_draws_them(tmp_path):
    from fedrad.common.metrics import reliability_bins
    from fedrad.server.report import write_report

    y = [0] * 80 + [1] * 70
    p = [0.1 + i / 200 for i in range(80)] + [0.5 + i / 200 for i in range(70)]  # 20 a bin; the last bin 10
    metrics = {"auc": 0.9}
    for name in ("uncorrected", "corrected"):
        for b, (n, conf, pos) in enumerate(reliability_bins(y, p)):
            if n >= 11:
                metrics.update({f"rel-{name}-{b}-n": n, f"rel-{name}-{b}-conf": conf, f"rel-{name}-{b}-pos": pos})
    site = SiteLog("s", train={1: {"n-train": 50}}, evaluate={1: metrics})
    report = build_report(RunConfig(), {"s": site}, **ARGS)
    bins = report["sites"][0]["reliability"]["uncorrected"]
    assert len(bins) == 10 and bins[0] is None  # empty: nothing sent
    assert bins[1] == [20.0, pytest.approx(0.1475), 0.0] and bins[8] is None  # 10 images < min-count 11
    assert sum(b[0] for b in bins if b) == sum(n for n, _, _ in reliability_bins(y, p) if n >= 11)
    write_report(report, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "Reliability diagrams before and after correction" in html and (tmp_path / "reliability.png").is_file()


def test_reliability_bins_match_scikit_learn_calibration_curve():
    import numpy as np
    from sklearn.calibration import calibration_curve

    from fedrad.common.metrics import reliability_bins

    rng = np.random.default_rng(0)
    p = rng.uniform(size=500)
    y = (rng.uniform(size=500) < p).astype(int)
    ours = [b for b in reliability_bins(y, p) if b[0]]
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose([b[2] for b in ours], prob_true, atol=1e-12)
    np.testing.assert_allclose([b[1] for b in ours], prob_pred, atol=1e-12)
    assert sum(b[0] for b in ours) == 500
