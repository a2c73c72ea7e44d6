"""The egress whitelist refuses anything but shared weights, scalar aggregates and the site name."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedrad.common.egress import EgressError, EgressPolicy, check_egress
from fedrad.common.records import TRAIN_METRICS, describe, from_numpy

POLICY = EgressPolicy.build({"_fc.weight": (2, 1280), "_fc.bias": (2,)}, TRAIN_METRICS)


def reply(arrays=None, metrics=None, config=None, **records):
    content = RecordDict({
        "arrays": from_numpy(arrays if arrays is not None else {"_fc.weight": np.zeros((2, 1280), np.float32),
                                                                 "_fc.bias": np.zeros(2, np.float32)}),
        "metrics": MetricRecord(metrics if metrics is not None else {"num-examples": 10, "train-loss": 0.5}),
        "site": ConfigRecord(config if config is not None else {"name": "site-a"}),
    })
    for name, record in records.items():
        content[name] = record
    return describe(content)


def test_a_proper_reply_passes():
    check_egress(reply(), POLICY, site="site-a")


@pytest.mark.parametrize("bad, match", [
    (dict(arrays={"images": np.zeros((10, 3, 96, 96), np.float32)}), "array 'images' is not a shared weight"),
    (dict(arrays={"_fc.weight": np.zeros((10, 1280), np.float32)}), "shape"),
    (dict(metrics={"num-examples": 10, "predictions": [0.1, 0.9, 0.3]}), "metric 'predictions' is not on"),
    (dict(metrics={"num-examples": 10, "train-loss": [0.1, 0.2]}), "must be a scalar"),
    (dict(config={"name": "a", "files": "img1.dcm,img2.dcm"}), "config value 'files'"),
    (dict(config={"name": ["a", "b"]}), "config value 'name'"),
    (dict(features=from_numpy({"f": np.zeros((10, 1280), np.float32)})), "record 'features'"),
])
def test_anything_per_image_is_refused(bad, match):
    with pytest.raises(EgressError, match=f"site site-a: .*{match}"):
        check_egress(reply(**bad), POLICY, site="site-a")


def test_label_shift_aggregates_pass_only_as_scalars():
    from fedrad.common.records import EVAL_METRICS, LABEL_SHIFT_METRICS

    policy = EgressPolicy.build({}, EVAL_METRICS)
    scalars = {"num-examples": 50, **{key: 0.5 for key in LABEL_SHIFT_METRICS}}
    content = RecordDict({"metrics": MetricRecord(scalars), "site": ConfigRecord({"name": "site-b"})})
    check_egress(describe(content), policy, site="site-b")
    content["metrics"] = MetricRecord({"num-examples": 50, "prior-em": [0.2, 0.8]})
    with pytest.raises(EgressError, match="site site-b: metric 'prior-em' must be a scalar"):
        check_egress(describe(content), policy, site="site-b")
