"""The egress whitelist lets BN statistics out only in their own record, by name and exact per-channel shape."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedrad.common.egress import EgressError, EgressPolicy, check_egress
from fedrad.common.records import TRAIN_METRICS, describe, from_numpy

WEIGHTS = {"_fc.weight": (2, 1280), "_fc.bias": (2,)}
BN = {"_bn1.running_mean": (1280,), "_bn1.running_var": (1280,)}


def reply(bn):
    content = RecordDict({
        "arrays": from_numpy({k: np.zeros(s, np.float32) for k, s in WEIGHTS.items()}),
        "metrics": MetricRecord({"num-examples": 10, "bn-samples": 10}),
        "site": ConfigRecord({"name": "site-a"}),
        "bn-stats": from_numpy({k: np.zeros(s, np.float32) for k, s in bn.items()}),
    })
    return describe(content)


def test_bn_statistics_pass_with_the_expected_names_and_shapes():
    check_egress(reply(BN), EgressPolicy.build(WEIGHTS, TRAIN_METRICS, bn_stats=BN), site="site-a")


@pytest.mark.parametrize("bn, policy_bn, match", [
    (BN, None, "record 'bn-stats' of kind arrays is not on the egress whitelist"),
    ({**BN, "activations": (10, 1280)}, BN, "array 'activations' is not a whitelisted BN statistic"),
    ({"_bn1.running_mean": (10, 1280), "_bn1.running_var": (1280,)}, BN, "has shape"),
    ({"_fc.weight": (2, 1280)}, BN, "'_fc.weight' is not a whitelisted BN statistic"),
])
def test_anything_else_in_the_bn_record_is_refused(bn, policy_bn, match):
    with pytest.raises(EgressError, match=f"site site-a: .*{match}"):
        check_egress(reply(bn), EgressPolicy.build(WEIGHTS, TRAIN_METRICS, bn_stats=policy_bn), site="site-a")
