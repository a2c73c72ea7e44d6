"""The coordinator's label-shift part: training prior from counts, sent with every evaluation; report rows."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedrad.common.config import RunConfig
from fedrad.common.records import LABEL_SHIFT, from_numpy, prior_from_record, prior_record
from fedrad.common.shift_flags import ShiftFlag
from fedrad.lab.synth import load_truth
from fedrad.server.aggregate import spec_of
from fedrad.server.label_shift import markdown_section, site_fields, training_prior
from fedrad.server.report import build_report, to_markdown
from fedrad.server.strategy import FedRad
from tests.helpers import site_reply

pytestmark = pytest.mark.usefixtures("flower_task")

SHARED = {"_fc.bias": np.zeros(2, np.float32)}


def test_training_prior_pools_the_sites_counts():
    prior = training_prior([{"n-class-0": 70, "n-class-1": 30}, {"n-class-0": 10, "n-class-1": 90}, {"auc": 0.9}])
    assert prior == pytest.approx([81 / 202, 121 / 202])  # add-one smoothed: (80 + 1) / (200 + 2)
    assert training_prior([{"auc": 0.9}]) is None and training_prior([]) is None
    assert dict(prior_record(np.array([0.25, 0.75]))) == {"prior-train-0": 0.25, "prior-train-1": 0.75}


def test_the_prior_record_decodes_what_it_encodes_and_names_a_missing_key():
    assert prior_from_record(prior_record(np.array([0.3, 0.7]))) == pytest.approx([0.3, 0.7])
    with pytest.raises(ValueError, match="no 'prior-train-1' key"):
        prior_from_record(ConfigRecord({"prior-train-0": 0.3}))


class FakeGrid:
    def get_node_ids(self):
        return [1, 2]


def train_reply(site: str, n0: int, n1: int) -> Message:
    content = RecordDict({"arrays": from_numpy({"_fc.bias": np.ones(2, np.float32)}),
                          "metrics": MetricRecord({"num-examples": n0 + n1, "train-loss": 0.1, "n-class-0": n0,
                                                   "n-class-1": n1}),
                          "site": ConfigRecord({"name": site})})
    return site_reply(content, site, "train")


def test_every_evaluation_carries_the_training_prior_once_counts_are_known():
    strategy = FedRad(expected=spec_of(SHARED), min_sites=2)
    arrays = from_numpy(SHARED)
    before = list(strategy.configure_evaluate(1, arrays, ConfigRecord({}), FakeGrid()))
    assert len(before) == 2 and all(LABEL_SHIFT not in m.content for m in before)
    strategy.aggregate_train(1, [train_reply("a", 30, 10), train_reply("b", 8, 32)])
    after = list(strategy.configure_evaluate(1, arrays, ConfigRecord({}), FakeGrid()))
    assert len(after) == 2
    for msg in after:
        assert msg.content[LABEL_SHIFT]["prior-train-1"] == pytest.approx(43 / 82)


def test_site_fields_take_truth_from_the_simulation_and_name_the_site(tmp_path):
    (tmp_path / "truth.json").write_text(json.dumps({"sites": [
        {"name": "site-b", "prior_true": 0.8, "prior_unlabelled_true": 0.78},
        {"name": "site-c", "prior_true": 0.2, "prior_unlabelled_true": None}]}))
    truth = load_truth(str(tmp_path))
    metrics = {"prior-em": 0.77, "ece-uncorrected": 0.1, "ece-corrected": 0.03, "auc-personalised": 0.9,
               "concept-shift": 1, "label-shift-flags": int(ShiftFlag.EM_FAILED | ShiftFlag.FEW_UNLABELLED)}
    row = site_fields("site-b", metrics, truth["site-b"])
    assert row["prior_true"] == 0.78 and row["prior_em"] == 0.77 and row["prior_bbse"] is None
    assert row["concept_shift"] is True
    assert row["label_shift_warnings"] == ["site site-b: EM did not converge. No label-shift correction: its "
                                           "posteriors are the global model's."]
    assert site_fields("site-c", {}, truth["site-c"])["prior_true"] == 0.2  # no unlabelled images: the site's prior
    assert row["disagreement_ci95"] is None  # no rate measured, no interval
    assert load_truth("") == {} and load_truth(str(tmp_path / "absent")) == {}


def test_report_has_the_label_shift_keys_and_section(tmp_path):
    from fedrad.server.strategy import SiteLog

    site = SiteLog("site-b", train={1: {"n-train": 100, "n-class-0": 20, "n-class-1": 80}},
                   evaluate={1: {"num-examples": 50, "auc": 0.9, "prior-em": 0.8, "ece-uncorrected": 0.12,
                                 "ece-corrected": 0.04, "ece-floor": 0.02, "brier-uncorrected": 0.2,
                                 "brier-corrected": 0.1,
                                 "auc-personalised": 0.91, "disagreement": 0.2, "concept-shift": 1}})
    report = build_report(RunConfig(data_dir=str(tmp_path)), {"site-b": site}, wall_seconds=1.0, full_model_bytes=10,
                          shared_payload_bytes=5, rejected=[], failed=[])
    row = report["sites"][0]
    for key in ("prior_true", "prior_em", "prior_bbse", "ece_uncorrected", "ece_corrected", "ece_floor",
                "brier_uncorrected", "brier_corrected", "auc_personalised"):
        assert key in row
    assert report["prior_train"] == pytest.approx(81 / 102)
    text = to_markdown(report)
    assert "Concept shift suspected at site-b" in text and "0.120 → 0.040 (0.020)" in text
    # 10 of 50 test images disagree: Wilson 95 % interval (z = 1.96) by hand, 0.112 to 0.330
    assert row["disagreement_ci95"] == pytest.approx([0.1124, 0.3304], abs=1e-4)
    assert "0.200 [0.11, 0.33] ⚑" in text
    assert markdown_section({"sites": [{"name": "x"}]}) == []  # nothing measured: no section


def test_the_report_takes_truth_only_from_its_caller_never_from_the_data_folder(tmp_path):
    from fedrad.server.strategy import SiteLog

    (tmp_path / "truth.json").write_text(json.dumps({"sites": [{"name": "site-b", "prior_true": 0.9}]}))
    site = SiteLog("site-b", train={1: {"n-train": 10, "n-class-0": 5, "n-class-1": 5}}, evaluate={1: {"auc": 0.9}})
    args = dict(wall_seconds=1.0, full_model_bytes=10, shared_payload_bytes=5, rejected=[], failed=[])
    cfg = RunConfig(data_dir=str(tmp_path))
    assert build_report(cfg, {"site-b": site}, **args)["sites"][0]["prior_true"] is None
    handed = build_report(cfg, {"site-b": site}, truth=load_truth(tmp_path), **args)
    assert handed["sites"][0]["prior_true"] == 0.9


def test_the_deployment_rows_reach_report_json_and_report_md(tmp_path):
    from fedrad.server.strategy import SiteLog

    methods = ("none", "labelled", "em", "bbse", "oracle")
    scores = {f"ece-deploy-{m}": 0.01 * (i + 1) for i, m in enumerate(methods)}
    scores.update({f"prior-deploy-{m}": 0.5 + 0.01 * i for i, m in enumerate(methods)})
    scores.update({f"brier-deploy-{m}": 0.2 for m in methods if m != "bbse"})  # BBSE refused: no scores
    del scores["ece-deploy-bbse"], scores["prior-deploy-bbse"]
    site = SiteLog("site-a", train={1: {"n-train": 10, "n-class-0": 5, "n-class-1": 5}},
                   evaluate={1: {"auc": 0.9, "ece-uncorrected": 0.1, "ece-corrected": 0.05, "n-deploy-eval": 300,
                                 "prior-labelled": 0.3, **scores}})
    truth = {"site-a": {"prior_true": 0.3, "prior_unlabelled_true": 0.6, "prior_deploy_true": 0.61}}
    report = build_report(RunConfig(), {"site-a": site}, wall_seconds=1.0, full_model_bytes=10, shared_payload_bytes=5,
                          rejected=[], failed=[], truth=truth)
    row = report["sites"][0]
    assert row["prior_labelled"] == 0.3 and row["prior_deploy_true"] == 0.61 and row["n_deploy_eval"] == 300
    assert [row[f"ece_deploy_{m}"] for m in methods] == [0.01, 0.02, 0.03, None, 0.05]
    assert row["prior_deploy_em"] == 0.52 and row["brier_deploy_oracle"] == 0.2 and row["brier_deploy_bbse"] is None
    text = to_markdown(report)
    assert "### On the deployment evaluation set" in text
    assert "| site-a | 300 | 0.300 | 0.610 | EM | 0.520 | 0.030 | 0.200 | – |" in text
    assert "| site-a | 300 | 0.300 | 0.610 | BBSE | – | – | – | – |" in text  # a refused row is shown, empty
