"""FedRad strategy: mock replies in, exact arithmetic out; BN never touched; bad updates rejected."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedrad.common.records import from_numpy, to_numpy
from fedrad.server.aggregate import spec_of
from fedrad.server.strategy import FedRad
from tests.helpers import site_reply

pytestmark = pytest.mark.usefixtures("flower_task")

SHARED = {"_fc.weight": np.zeros((2, 3), np.float32), "_fc.bias": np.zeros(2, np.float32)}


def train_reply(site, w, n, **extra):
    arrays = {"_fc.weight": np.full((2, 3), w, np.float32), "_fc.bias": np.full(2, w, np.float32), **extra}
    content = RecordDict({"arrays": from_numpy(arrays),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": w}),
                          "site": ConfigRecord({"name": site})})
    return site_reply(content, site, "train")


def strategy(min_sites=2, weight_cap=0.0):
    return FedRad(expected=spec_of(SHARED), min_sites=min_sites, weight_cap=weight_cap)


def test_average_weighted_by_samples_over_shared_keys_only():
    s = strategy()
    arrays, metrics = s.aggregate_train(1, [train_reply("a", 1.0, 10), train_reply("b", 3.0, 30)])
    out = to_numpy(arrays)
    assert set(out) == set(SHARED)  # no BN key can appear: only the expected shared keys pass
    np.testing.assert_allclose(out["_fc.weight"], np.full((2, 3), 2.5))
    assert metrics["train-loss"] == pytest.approx(2.5)
    assert s.sites["a"].bytes_sent[1] > 24 and s.sites["b"].train[1]["num-examples"] == 30


def test_an_update_carrying_bn_is_rejected_and_the_rest_averaged():
    s = strategy()
    bad = train_reply("c", 100.0, 10, **{"_bn1.running_mean": np.ones(3, np.float32)})
    arrays, _ = s.aggregate_train(2, [train_reply("a", 1.0, 10), train_reply("b", 3.0, 10), bad])
    np.testing.assert_allclose(to_numpy(arrays)["_fc.bias"], [2.0, 2.0])
    assert [(r, site) for r, site, _ in s.rejected] == [(2, "c")]
    assert "unexpected" in s.rejected[0][2]


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_poisoned_update_never_reaches_the_global_model(poison):
    s = strategy()
    arrays, _ = s.aggregate_train(1, [train_reply("a", 1.0, 10), train_reply("b", 1.0, 10),
                                      train_reply("evil", poison, 1000)])
    assert np.isfinite(to_numpy(arrays)["_fc.weight"]).all()
    assert s.rejected[0][1] == "evil"


def test_too_few_valid_updates_keep_the_global_model():
    s = strategy(min_sites=2)
    failed = Message(Error(code=0, reason="site crashed"), reply_to=train_reply("x", 0, 1))
    assert s.aggregate_train(1, [train_reply("a", 1.0, 10), failed]) == (None, None)
    assert s.failed == [(1, "node-" + str(failed.metadata.src_node_id), "flower error 0")]  # the code, not the text


def test_evaluate_keeps_per_site_metrics_and_weighted_means():
    s = strategy()
    replies = [site_reply(RecordDict({"metrics": MetricRecord({"num-examples": n, "auc": auc, "ece": 0.1,
                                                                "balanced-accuracy": 0.7}),
                                      "site": ConfigRecord({"name": name})}), name, "evaluate")
               for name, n, auc in (("a", 10, 0.9), ("b", 30, 0.7))]
    seen = []
    s.on_round = lambda rnd, sites: seen.append((rnd, sorted(sites)))
    out = s.aggregate_evaluate(3, replies)
    assert out["auc"] == pytest.approx((10 * 0.9 + 30 * 0.7) / 40)
    assert s.sites["a"].evaluate[3]["auc"] == pytest.approx(0.9)
    assert seen == [(3, ["a", "b"])]


def test_a_scaled_update_is_rejected_by_the_norm_rule_with_the_site_name():
    s = FedRad(expected=spec_of(SHARED), min_sites=2, norm_outlier_factor=10.0)
    s.reference = {k: v.copy() for k, v in SHARED.items()}  # the global model the round started from
    arrays, metrics = s.aggregate_train(1, [train_reply("a", 1.0, 10), train_reply("b", 2.0, 10),
                                            train_reply("evil", 1000.0, 10)])
    np.testing.assert_allclose(to_numpy(arrays)["_fc.weight"], np.full((2, 3), 1.5))
    assert metrics["sites"] == 2
    assert [(r, site) for r, site, _ in s.rejected] == [(1, "evil")]
    assert "norm-outlier-factor" in s.rejected[0][2] and "site evil" in s.rejected[0][2]
    assert "evil" not in s.sites


def test_the_norm_rule_is_off_without_a_reference_or_with_factor_zero():
    s = FedRad(expected=spec_of(SHARED), min_sites=2, norm_outlier_factor=0.0)
    s.reference = {k: v.copy() for k, v in SHARED.items()}
    s.aggregate_train(1, [train_reply("a", 1.0, 10), train_reply("b", 1000.0, 10)])
    assert s.rejected == []


@pytest.mark.parametrize("bad, match", [
    ({"_fc.weight": np.zeros((3, 2), np.float32)}, "has shape"),
    ({"_fc.weight": np.zeros((2, 3), np.float64)}, "has dtype"),
])
def test_wrong_shape_or_dtype_is_rejected(bad, match):
    s = strategy()
    evil = train_reply("evil", 1.0, 10)
    evil.content["arrays"] = from_numpy({**to_numpy(evil.content["arrays"]), **bad})
    arrays, _ = s.aggregate_train(1, [train_reply("a", 1.0, 10), train_reply("b", 3.0, 10), evil])
    np.testing.assert_allclose(to_numpy(arrays)["_fc.weight"], np.full((2, 3), 2.0))
    assert s.rejected[0][1] == "evil" and match in s.rejected[0][2]


def test_the_average_does_not_depend_on_which_site_answered_first():
    """Float sums depend on order; the same updates in any arrival order must give the same bits."""
    rng = np.random.default_rng(0)
    expected = {"w": np.zeros(20_000, np.float32)}

    def reply(site, n):
        content = RecordDict({"arrays": from_numpy({"w": rng.standard_normal(20_000).astype(np.float32)}),
                              "metrics": MetricRecord({"num-examples": n}), "site": ConfigRecord({"name": site})})
        return site_reply(content, site, "train")

    replies = [reply(f"site-{i}", n) for i, n in enumerate([7, 13, 101, 3, 29, 11, 17])]
    results = set()
    for order in range(10):
        shuffled = [replies[i] for i in np.random.default_rng(order).permutation(len(replies))]
        arrays, _ = FedRad(expected=spec_of(expected), min_sites=2).aggregate_train(1, shuffled)
        results.add(to_numpy(arrays)["w"].tobytes())
    assert len(results) == 1


def test_a_failed_reply_is_kept_as_its_code_and_incident_never_as_text():
    s = strategy(min_sites=1)
    coded = Message(Error(code=101, reason="policy-refused incident=0123456789ab"), reply_to=train_reply("x", 0, 1))
    leaky = Message(Error(code=105, reason="internal: /data/doe_john_mrn12345.dcm,1,train"),
                    reply_to=train_reply("y", 0, 1))
    s.aggregate_train(1, [train_reply("a", 1.0, 10), coded, leaky])
    reasons = [why for _, _, why in s.failed]
    assert reasons == ["policy-refused (incident 0123456789ab)", "internal"]
    assert "doe_john" not in repr(s.failed)


def test_one_site_claiming_1e12_examples_is_capped_at_weight_cap_times_the_others_median():
    s = strategy(min_sites=1, weight_cap=10.0)
    replies = [train_reply("a", 1.0, 100), train_reply("b", 2.0, 100), train_reply("c", 50.0, 1e12)]
    arrays, _ = s.aggregate_train(1, replies)
    weights = {name: log.train[1]["weight"] for name, log in s.sites.items()}
    assert weights == {"a": 100, "b": 100, "c": 1000}  # 10 x the median of the others' 100
    share = weights["c"] / sum(weights.values())
    assert share == pytest.approx(1000 / 1200)
    expected = (1.0 * 100 + 2.0 * 100 + 50.0 * 1000) / 1200
    np.testing.assert_allclose(to_numpy(arrays)["_fc.bias"], expected, rtol=1e-6)
    uncapped = strategy(min_sites=1, weight_cap=0.0)
    arrays, _ = uncapped.aggregate_train(1, replies)
    assert to_numpy(arrays)["_fc.bias"][0] == pytest.approx(50.0, rel=1e-6)  # without the cap c is the model


def test_a_site_count_may_not_grow_during_the_run():
    s = strategy(min_sites=1)
    s.aggregate_train(1, [train_reply("a", 1.0, 40), train_reply("b", 1.0, 40)])
    s.aggregate_train(2, [train_reply("a", 1.0, 4000), train_reply("b", 1.0, 30)])
    assert s.sites["a"].train[2]["weight"] == 40 and s.sites["b"].train[2]["weight"] == 30


def test_a_second_node_using_a_bound_name_is_refused_and_named():
    s = strategy(min_sites=1)
    honest = train_reply("a", 1.0, 10)
    impostor = Message(honest.content, reply_to=Message(RecordDict(), dst_node_id=999, message_type="train"))
    s.aggregate_train(1, [honest, impostor])
    assert [(site, "already bound" in why) for _, site, why in s.rejected] == [("node-999", True)]
    assert s.sites["a"].train[1]["weight"] == 10  # counted once


def test_a_registered_node_cannot_answer_as_another_site():
    s = strategy(min_sites=1)
    reply = train_reply("b", 1.0, 10)
    s.node_names[reply.metadata.src_node_id] = "a"  # what the coordinator's registry says this node is
    assert s.aggregate_train(1, [reply]) == (None, None)
    assert "declares 'b'" in s.rejected[0][2]
