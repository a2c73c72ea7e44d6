"""The coordinator's reference exchange and per-round shift score: mock sites in, exact arithmetic out."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedrad.common.config import RunConfig
from fedrad.common.feature_shift import moments, shift_scores
from fedrad.common.harmonize import N_BINS, intensity_histogram, pool_histograms
from fedrad.common.packing import unpack_content
from fedrad.common.records import from_numpy
from fedrad.server.aggregate import spec_of
from fedrad.server.reference import choose_spacing, exchange_reference, needed
from fedrad.server.shift_tracking import FedRadShift
from tests.helpers import site_reply

pytestmark = pytest.mark.usefixtures("flower_task")

RNG = np.random.default_rng(0)
SITES = {  # name: (spacing mm, images, HU sample, projected features)
    "a": (0.7, 70, RNG.normal(-850, 20, 60_000), RNG.normal(0.0, 1.0, (70, 4))),
    "b": (0.9, 80, RNG.normal(-800, 40, 50_000), RNG.normal(0.5, 1.0, (80, 4))),
    "c": (1.0, 10, np.full(20_000, -1024.0), RNG.normal(3.0, 1.0, (10, 4))),  # constant: excluded
}


class FakeGrid:
    """Answers query messages like the sites above would; records what it was sent."""

    def __init__(self):
        self.sent = []

    def get_node_ids(self):
        return [1, 2, 3]

    def get_nodes(self):  # as a deployment's SuperLink lists them: with the names the sites were registered under
        return [SimpleNamespace(node_id=node, name="abc"[node - 1]) for node in self.get_node_ids()]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for node, msg in zip(self.get_node_ids(), messages):
            msg.content = unpack_content(msg.content)  # as a site's ClientApp reads it
            self.sent.append(msg)
            name = "abc"[node - 1]
            spacing, n, hu, z = SITES[name]
            config = msg.content["config"]
            if config["fedrad-query"] == "reference":
                metrics = {"n-images": n, "n-pixels": hu.size, "n-constant": 0, "spacing-median-mm": spacing,
                           "spacing-p05-mm": spacing, "spacing-p95-mm": spacing}
                records = {} if config["spacing-mm"] == 0 else {"intensity": from_numpy(
                    {"histogram": intensity_histogram(hu)})}
            else:
                assert msg.content["reference"]["projection"].numpy().shape == (4, 1280)
                m = moments(z)
                records = {"moments": from_numpy({"raw/feature-mean": m.mean, "raw/feature-cov": m.cov,
                                                  "harmonized/feature-mean": m.mean / 2,
                                                  "harmonized/feature-cov": m.cov})}
                metrics = {"n-features": n}
            content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": name}), **records})
            replies.append(Message(content, reply_to=msg))
        return replies


def test_the_reference_pools_the_usable_histograms_and_leaves_out_a_constant_site(caplog, tmp_path):
    cfg = RunConfig(harmonize="quantile", shift_dim=4, spacing_mm=0.0)
    grid = FakeGrid()
    with caplog.at_level(logging.WARNING, logger="fedrad.coordinator"):
        result = exchange_reference(grid, cfg)
    kinds = [m.content["config"]["fedrad-query"] for m in grid.sent]
    assert kinds == ["reference"] * 3 + ["reference"] * 3 + ["shift"] * 3  # spacings, histograms, moments
    assert all(m.metadata.message_type == "query" for m in grid.sent)
    assert result.asked == {1: "a", 2: "b", 3: "c"}  # round 1 waits for these if one drops out (rejoin-wait)
    assert result.cfg.spacing_mm == 0.9 and result.spacing_source == "median of the sites"  # 70 x 0.7, 80 x 0.9, 10 x 1.0
    np.testing.assert_array_equal(result.reference, pool_histograms([intensity_histogram(SITES[s][2]) for s in "ab"]))
    assert "site c: all its intensities fall in one 2 HU bin" in caplog.text and result.sites["c"].excluded
    expected = shift_scores({s: moments(SITES[s][3]) for s in "abc"})
    assert result.round0_scores()["raw"] == pytest.approx(expected)
    broadcast = result.broadcast()
    assert set(broadcast.keys()) == {"reference-histogram", "projection"}
    path = result.save(tmp_path)
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["reference_counts"], result.reference)
        assert saved["bin_edges_hu"].shape == (N_BINS + 1,) and float(saved["spacing_mm"]) == 0.9


def test_without_any_usable_histogram_harmonisation_is_switched_off_not_a_crash(caplog):
    SITES_BACKUP = dict(SITES)
    try:
        for s in "ab":
            SITES[s] = (SITES[s][0], SITES[s][1], np.full(100, 40.0), SITES[s][3])
        with caplog.at_level(logging.WARNING, logger="fedrad.coordinator"):
            result = exchange_reference(FakeGrid(), RunConfig(harmonize="landmarks", shift_dim=0))
    finally:
        SITES.update(SITES_BACKUP)
    assert result.cfg.harmonize == "off" and result.reference is None and result.broadcast() is None
    assert "harmonisation is switched off" in caplog.text and "site a: only 100 pixels" in caplog.text


def test_choose_spacing_and_when_the_exchange_runs():
    assert choose_spacing({"a": (0.5, 10), "b": (1.0, 11)}) == 1.0
    assert choose_spacing({"a": (0.5, 10), "b": (1.0, 9), "c": (0.7, 1)}) == 0.5
    with pytest.raises(ValueError, match="set spacing-mm explicitly"):
        choose_spacing({"a": (float("nan"), 3)})
    assert not needed(RunConfig(shift_dim=0)) and needed(RunConfig()) and needed(RunConfig(shift_dim=0, spacing_mm=0))


def evaluate_reply(name, z):
    m = moments(z)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "auc": 0.9, "n-features": len(z)}),
                          "site": ConfigRecord({"name": name}),
                          "moments": from_numpy({"feature-mean": m.mean, "feature-cov": m.cov})})
    return site_reply(content, name, "evaluate")


def test_the_strategy_scores_every_round_from_moments_only():
    shared = {"_fc.bias": np.zeros(2, np.float32)}
    strategy = FedRadShift(broadcast=from_numpy({"projection": np.zeros((4, 1280), np.float32)}),
                           expected=spec_of(shared), min_sites=2)
    feats = {s: RNG.normal(i, 1.0, (30, 4)) for i, s in enumerate("ab")}
    metrics = strategy.aggregate_evaluate(3, [evaluate_reply(s, z) for s, z in feats.items()])
    assert metrics["auc"] == pytest.approx(0.9)  # FedRad's own aggregation still runs
    assert strategy.shift[3] == pytest.approx(shift_scores({s: moments(z) for s, z in feats.items()}))
    assert strategy.sites["a"].evaluate[3]["n-features"] == 30.0


def test_unusable_moments_are_logged_and_the_round_goes_on(caplog):
    strategy = FedRadShift(broadcast=None, expected=spec_of({"_fc.bias": np.zeros(2, np.float32)}), min_sites=1)
    bad = evaluate_reply("a", RNG.normal(size=(30, 4)))
    bad.content["moments"] = from_numpy({"feature-mean": np.zeros(4)})  # no covariance
    with caplog.at_level(logging.WARNING, logger="fedrad.coordinator"):
        metrics = strategy.aggregate_evaluate(1, [bad, evaluate_reply("b", RNG.normal(size=(30, 4)))])
    assert "site a sent unusable feature moments" in caplog.text
    assert set(strategy.shift[1]) == {"b"} and metrics["auc"] == pytest.approx(0.9)
