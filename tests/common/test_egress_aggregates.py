"""The egress whitelist names the harmonisation aggregates exactly: the histogram and the feature moments."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedrad.common.egress import EgressError, EgressPolicy, aggregate_records, check_egress
from fedrad.common.harmonize import N_BINS
from fedrad.common.records import EVAL_METRICS, N_FEATURES, REFERENCE_METRICS, describe, from_numpy


def content(metrics=None, **records):
    out = RecordDict({"metrics": MetricRecord(metrics or {"num-examples": 10}), "site": ConfigRecord({"name": "site-a"})})
    for name, arrays in records.items():
        out[name] = from_numpy(arrays)
    return describe(out)


def test_reference_reply_may_carry_exactly_the_histogram():
    policy = EgressPolicy.build({}, REFERENCE_METRICS, records=aggregate_records("reference", 16))
    check_egress(content({"n-images": 10, "spacing-median-mm": 0.7}, intensity={"histogram": np.zeros(N_BINS, np.int64)}), policy, site="site-a")
    for bad, match in [
        ({"intensity": {"histogram": np.zeros(N_BINS + 1, np.int64)}}, "shape"),
        ({"intensity": {"pixels": np.zeros(N_BINS, np.int64)}}, "array 'pixels' is not a whitelisted 'intensity'"),
        ({"moments": {"feature-mean": np.zeros(16)}}, "record 'moments'"),
        ({"arrays": {"x": np.zeros(3)}}, "array 'x' is not a shared weight"),
    ]:
        with pytest.raises(EgressError, match=f"site site-a: .*{match}"):
            check_egress(content({"n-images": 10}, **bad), policy, site="site-a")


def test_evaluate_reply_may_carry_mean_and_covariance_in_the_projection_only():
    policy = EgressPolicy.build({}, (*EVAL_METRICS, N_FEATURES), records=aggregate_records("evaluate", 16))
    check_egress(content(moments={"feature-mean": np.zeros(16), "feature-cov": np.zeros((16, 16))}), policy,
                 site="site-a")
    for bad in ({"feature-mean": np.zeros(1280)},  # unprojected features
                {"feature-mean": np.zeros(16), "feature-cov": np.zeros((16, 16)), "features": np.zeros((30, 16))}):
        with pytest.raises(EgressError, match="site site-a"):
            check_egress(content(moments=bad), policy, site="site-a")
    with pytest.raises(EgressError, match="record 'moments'"):  # shift score off: no moments at all
        check_egress(content(moments={"feature-mean": np.zeros(16)}),
                     EgressPolicy.build({}, EVAL_METRICS, records=aggregate_records("evaluate", 0)), site="site-a")


def test_shift_query_and_train_replies():
    shift = aggregate_records("shift", 8)
    assert shift == {"moments": {"raw/feature-mean": (8,), "raw/feature-cov": (8, 8),
                                 "harmonized/feature-mean": (8,), "harmonized/feature-cov": (8, 8)}}
    assert aggregate_records("train", 16) == {}
