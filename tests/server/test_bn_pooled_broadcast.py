"""bn-shrink at the coordinator: every training message carries the registry's pooled BN statistics, once known."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedrad.common.records import BN_POOLED, from_numpy, to_numpy
from fedrad.server.aggregate import spec_of
from fedrad.server.strategy import FedRad
from tests.helpers import site_reply

pytestmark = pytest.mark.usefixtures("flower_task")

SHARED = {"_fc.bias": np.zeros(2, np.float32)}
BN = {"_bn1.running_mean": np.zeros(3, np.float32), "_bn1.running_var": np.ones(3, np.float32)}


class FakeGrid:
    def get_node_ids(self):
        return [1, 2]


def reply(site, n, mean, var):
    content = RecordDict({"arrays": from_numpy({"_fc.bias": np.ones(2, np.float32)}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.1, "bn-samples": n}),
                          "site": ConfigRecord({"name": site}),
                          "bn-stats": from_numpy({"_bn1.running_mean": np.full(3, mean, np.float32),
                                                  "_bn1.running_var": np.full(3, var, np.float32)})})
    return site_reply(content, site, "train")


@pytest.mark.parametrize("shrink", [0.0, 50.0])
def test_training_messages_carry_the_pooled_bn_statistics_only_with_bn_shrink(shrink):
    strategy = FedRad(expected=spec_of(SHARED), min_sites=2, bn_expected=spec_of(BN), bn_shrink=shrink)
    arrays = from_numpy(SHARED)
    first = list(strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid()))
    assert len(first) == 2 and all(BN_POOLED not in m.content for m in first)  # round 1: nothing pooled yet
    strategy.aggregate_train(1, [reply("a", 10, 0.0, 1.0), reply("b", 30, 2.0, 4.0)])
    two = list(strategy.configure_train(2, arrays, ConfigRecord({}), FakeGrid()))
    assert all(BN_POOLED not in m.content for m in two)  # a pool of two: either site could read the other's off it
    # a third site with exactly a and b's pooled moments (mean 1.5, variance 4.0) leaves the pool unchanged
    strategy.aggregate_train(1, [reply("a", 10, 0.0, 1.0), reply("b", 30, 2.0, 4.0), reply("c", 40, 1.5, 4.0)])
    second = list(strategy.configure_train(2, arrays, ConfigRecord({}), FakeGrid()))
    assert len(second) == 2
    if shrink == 0:
        assert all(BN_POOLED not in m.content for m in second)
        return
    for msg in second:  # the registry's pooled statistics, by the law of total variance, the same for every site
        pooled = to_numpy(msg.content[BN_POOLED])
        assert set(pooled) == set(BN)
        np.testing.assert_allclose(pooled["_bn1.running_mean"], 1.5)
        np.testing.assert_allclose(pooled["_bn1.running_var"], 0.25 * (1.0 + 1.5**2) + 0.75 * (4.0 + 0.5**2))
        assert "arrays" in msg.content  # the shared weights still travel as before
