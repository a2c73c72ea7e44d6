"""FedRad with BN statistics: validated into the registry, never averaged into the model; bad ones rejected."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedrad.common.records import from_numpy, to_numpy
from fedrad.server.aggregate import spec_of
from fedrad.server.strategy import FedRad
from tests.helpers import site_reply

pytestmark = pytest.mark.usefixtures("flower_task")

SHARED = {"_fc.weight": np.zeros((2, 3), np.float32), "_fc.bias": np.zeros(2, np.float32)}
BN = {"_bn1.running_mean": np.zeros(4, np.float32), "_bn1.running_var": np.ones(4, np.float32)}


def reply(site, w, n, mean=0.0, var=1.0, count=None, bn=True, **bn_extra):
    content = RecordDict({"arrays": from_numpy({k: np.full(a.shape, w, np.float32) for k, a in SHARED.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": w,
                                                   "bn-samples": n if count is None else count}),
                          "site": ConfigRecord({"name": site})})
    if bn:
        content["bn-stats"] = from_numpy({"_bn1.running_mean": np.full(4, mean, np.float32),
                                          "_bn1.running_var": np.full(4, var, np.float32), **bn_extra})
    return site_reply(content, site, "train")


def strategy(bn=True):
    return FedRad(expected=spec_of(SHARED), min_sites=2, bn_expected=spec_of(BN) if bn else None)


def test_bn_statistics_go_to_the_registry_and_not_into_the_model():
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply("a", 1.0, 10, mean=0.0, var=1.0), reply("b", 3.0, 30, mean=2.0, var=1.0)])
    assert set(to_numpy(arrays)) == set(SHARED)  # the averaged model holds no BN
    assert [(e["site"], e["round"], e["count"]) for e in s.bn_registry.summary()] == [("a", 1, 10), ("b", 1, 30)]
    pooled = s.bn_registry.pooled()
    np.testing.assert_allclose(pooled["_bn1.running_mean"], 1.5)
    np.testing.assert_allclose(pooled["_bn1.running_var"], 1.0 + 0.25 * 1.5**2 + 0.75 * 0.5**2)


@pytest.mark.parametrize("bad, match", [
    (dict(var=-1.0), "running_var is negative"),
    (dict(mean=np.nan), "NaN or Inf"),
    (dict(count=0), "'bn-samples' must be a positive whole number"),
    (dict(count=2.5), "'bn-samples' must be a positive whole number"),
    (dict(bn=False), "lacks the 'bn-stats' record"),
    ({"_blocks.0._bn1.running_mean": np.zeros(4, np.float32)}, "unexpected"),
])
def test_a_bad_bn_report_rejects_the_whole_update(bad, match):
    s = strategy()
    arrays, _ = s.aggregate_train(2, [reply("a", 1.0, 10), reply("b", 3.0, 10), reply("evil", 100.0, 1000, **bad)])
    np.testing.assert_allclose(to_numpy(arrays)["_fc.bias"], [2.0, 2.0])  # evil's weights never averaged
    assert [(r, site) for r, site, _ in s.rejected] == [(2, "evil")]
    assert match in s.rejected[0][2] and "evil" in s.rejected[0][2]
    assert "evil" not in s.bn_registry.sites


def test_bn_statistics_a_run_does_not_expect_are_refused():
    s = strategy(bn=False)
    arrays, _ = s.aggregate_train(1, [reply("a", 1.0, 10, bn=False), reply("b", 1.0, 10, bn=False),
                                      reply("c", 1.0, 10)])
    assert arrays is not None and [site for _, site, _ in s.rejected] == ["c"]
    assert s.bn_registry.sites == {}


def test_a_round_below_min_sites_still_records_valid_bn_reports():
    s = strategy()
    s.aggregate_train(1, [reply("a", 1.0, 10), reply("b", 3.0, 30)])
    assert s.aggregate_train(2, [reply("a", 1.0, 10)]) == (None, None)  # fewer than min-sites
    assert s.bn_registry.sites["a"].server_round == 2 and s.bn_registry.sites["b"].server_round == 1
