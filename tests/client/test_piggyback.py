"""One message per round: an evaluation riding in a train message equals the two messages it replaces."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

import fedrad.client.app as site_app
from fedrad.common.config import RunConfig
from fedrad.common.finetune import shared_keys
from fedrad.common.model import build_model
from fedrad.common.piggyback import RideError, ask, combine, evaluate_round, rides, split
from fedrad.common.records import ARRAYS, config_record, to_array_record
from tests.helpers import small_site_policy
from tests.helpers import tiny_site as tiny_site_in

pytestmark = pytest.mark.usefixtures("flower_task")


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    return tiny_site_in(tmp_path_factory.mktemp("data"), seed=2)


def message(cfg: RunConfig, kind: str, server_round: int) -> Message:
    model = build_model(cfg)
    arrays = to_array_record(model.state_dict(), shared_keys(model, cfg.bn_mode))
    config = config_record(cfg.to_run_config(), {"server-round": server_round})
    return Message(content=RecordDict({ARRAYS: arrays, "config": config}), dst_node_id=1, message_type=kind)


def context(site, work) -> Context:
    return Context(run_id=1, node_id=1, node_config={"data-dir": str(site), "work-dir": str(work)},
                   state=RecordDict(), run_config={})


def test_one_message_gives_what_an_evaluate_then_a_train_message_give(tiny_site, tmp_path):
    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, out_dir=str(tmp_path))
    two = context(tiny_site, tmp_path / "two")
    evaluated = site_app.evaluate_(message(cfg, "evaluate", 1), two)
    trained = site_app.train(message(cfg, "train", 2), two)

    msg = message(cfg, "train", 2)
    ask(msg.content, RecordDict(), 1)
    assert evaluate_round(msg.content) == 1
    out = site_app.train(msg, context(tiny_site, tmp_path / "one"))
    assert not out.has_error() and rides(out.content)
    train, refused, evaluation = split(out.content)
    assert refused is None
    assert set(train.keys()) == set(trained.content.keys()) and set(evaluation.keys()) == {"metrics", "site"}
    assert dict(evaluation["metrics"]) == dict(evaluated.content["metrics"])  # the same model, the same BN
    for key, array in trained.content["arrays"].items():  # trained from the same state with the same seed
        np.testing.assert_array_equal(train["arrays"][key].numpy(), array.numpy())
    same = {k: v for k, v in trained.content["metrics"].items() if k != "seconds"}
    assert {k: train["metrics"][k] for k in same} == same


def test_a_site_that_may_not_train_still_sends_its_evaluation_and_a_code(tiny_site, tmp_path):
    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, out_dir=str(tmp_path))
    small_site_policy(tiny_site.parent, "min-count = 2\n")
    (tiny_site / "site-policy.toml").write_text("min-count = 15\n")  # 16 patients: fewer labelled training images
    try:
        msg = message(cfg, "train", 3)
        ask(msg.content, RecordDict(), 2)
        out = site_app.train(msg, context(tiny_site, tmp_path / "w"))
    finally:
        small_site_policy(tiny_site.parent)
    train, refused, evaluation = split(out.content)
    assert train is None and refused[0] == "small-count"
    assert f"incident {refused[1]}" in (tmp_path / "w" / "incidents.log").read_text()  # the text stays at the site
    assert evaluation["metrics"]["num-examples"] > 0
    assert dict(evaluation["withheld"]) == {"test-metrics": "small-count"}  # too few test images for this policy


def test_replies_that_do_not_fit_together_are_refused():
    evaluation = RecordDict({"metrics": MetricRecord({"auc": 0.5})})
    train = RecordDict({"metrics": MetricRecord({"train-loss": 0.1})})
    with pytest.raises(RideError, match="either"):
        combine(train, evaluation, ("small-count", "0123456789ab"))
    content = combine(train, evaluation)
    content["train-refused"] = ConfigRecord({"code": "small-count", "incident": "0123456789ab"})
    with pytest.raises(RideError, match="no train records"):
        split(content)
    with pytest.raises(RideError, match="no evaluate records"):
        split(RecordDict({"metrics": MetricRecord({"train-loss": 0.1})}))
    bad = RecordDict({"evaluate-first": ConfigRecord({"server-round": 0})})
    with pytest.raises(RideError, match="server-round"):
        evaluate_round(bad)
