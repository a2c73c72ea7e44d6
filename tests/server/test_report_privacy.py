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
