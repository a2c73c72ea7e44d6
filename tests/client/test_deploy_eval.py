"""The deployment evaluation set: every correction scored there, and its labels used for nothing else."""

import csv

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from scipy.special import log_softmax

import fedrad.client.app as site_app
from fedrad.client.deploy_eval import AUDIT_FILE, METHODS, DeployAudit, metric_keys, score_corrections
from fedrad.client.folds import two_folds
from fedrad.client.site_shift import bbse_cross_fitted, correct_site
from fedrad.common.config import RunConfig
from fedrad.common.records import EVAL_METRICS
from tests.client.test_app import message
from tests.helpers import tiny_site

REF = np.array([0.5, 0.5])


def logits_at(n: int, prior_pos: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of an over-confident model (4x + 0.5; Bayes 2x under a 0.5 prior) and labels at `prior_pos`."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=int)
    y[: round(prior_pos * n)] = 1
    rng.shuffle(y)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    return np.stack([np.zeros(n), 4 * x + 0.5], axis=1), y


def test_under_deployment_shift_em_beats_the_labelled_prior_and_every_row_names_its_prior():
    z_test, y_test = logits_at(700, 0.3, seed=0)  # the labelled population: screening, 0.3
    z_pool, _ = logits_at(1000, 0.7, seed=1)  # deployed where 0.7 are malignant
    z_eval, y_eval = logits_at(600, 0.7, seed=2)
    g = lambda z: log_softmax(z, axis=1)  # noqa: E731
    folds = two_folds([str(i) for i in range(len(y_test))], y_test, seed=0)
    fix = correct_site(g(z_test), y_test, folds, g(z_pool), REF, np.array([0.7, 0.3]))
    out = score_corrections(DeployAudit(z_eval, y_eval), g(z_eval), REF, fix.calibrate, fix.priors)
    assert out["n-deploy-eval"] == 600
    assert out["prior-deploy-none"] == 0.5 and out["prior-deploy-labelled"] == pytest.approx(0.3)
    assert out["prior-deploy-oracle"] == pytest.approx(0.7)
    assert abs(out["prior-deploy-em"] - 0.7) < 0.04 and abs(out["prior-deploy-bbse"] - 0.7) < 0.06
    assert out["ece-deploy-em"] <= 0.5 * out["ece-deploy-labelled"]
    assert out["brier-deploy-em"] < out["brier-deploy-labelled"]
    assert out["ece-deploy-oracle"] <= out["ece-deploy-labelled"]
    assert set(out) <= set(metric_keys()) <= set(EVAL_METRICS)  # every key passes the egress whitelist
    assert len(metric_keys()) == 2 + 4 * len(METHODS)


def test_rows_without_a_prior_are_left_out_and_no_calibration_means_reweighting_only():
    z_eval, y_eval = logits_at(200, 0.6, seed=3)
    g = log_softmax(z_eval, axis=1)
    out = score_corrections(DeployAudit(z_eval, y_eval), g, REF, None, {"labelled": np.array([0.4, 0.6])})
    assert "ece-deploy-em" not in out and "prior-deploy-bbse" not in out
    assert {"ece-deploy-none", "ece-deploy-labelled", "ece-deploy-oracle"} <= set(out)
    # prior 0.6 vs oracle 0.6 (exact): the same posteriors, the same scores
    assert out["ece-deploy-labelled"] == pytest.approx(out["ece-deploy-oracle"])
    assert score_corrections(DeployAudit(np.zeros((0, 2)), np.zeros(0, int)), np.zeros((0, 2)), REF, None,
                             {}) == {"n-deploy-eval": 0}


def test_bbse_is_cross_fitted_and_refuses_a_model_that_cannot_separate():
    z_test, y_test = logits_at(400, 0.5, seed=4)
    z_pool, y_pool = logits_at(800, 0.8, seed=5)
    folds = two_folds([str(i) for i in range(400)], y_test, seed=0)
    est = bbse_cross_fitted(log_softmax(z_test, axis=1), y_test, folds, log_softmax(z_pool, axis=1), REF)
    assert est.ok and abs(est.prior[1] - y_pool.mean()) < 0.06
    noise = np.random.default_rng(6).normal(size=(400, 2)) * 0.01  # no signal: TPR ~ FPR
    refused = bbse_cross_fitted(log_softmax(noise, axis=1), y_test, folds, log_softmax(z_pool, axis=1), REF)
    assert not refused.ok and refused.reason.startswith("fold ") and "|TPR − FPR|" in refused.reason


@pytest.fixture(scope="module")
def deployed_site(tmp_path_factory):
    return tiny_site(tmp_path_factory.mktemp("deployed"), name="dep", n_patients=60, test_fraction=0.7,
                     prevalence=0.4, n_deploy=12, n_deploy_eval=14, deploy_prevalence=0.8, image_size=64)


def _evaluate(site, tmp_path, sub):
    cfg = RunConfig(num_server_rounds=1, fov_mm=32.0, out_dir=str(tmp_path), personalise_steps=5)
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(site), "work-dir": str(tmp_path / sub)},
                      state=RecordDict(), run_config={})
    msg = message(cfg, "evaluate")
    msg.content["label-shift"] = ConfigRecord({"prior-train-0": 0.5, "prior-train-1": 0.5})
    return dict(site_app.evaluate_(msg, context).content["metrics"])


@pytest.mark.usefixtures("flower_task")
def test_the_audit_labels_change_nothing_but_their_own_scores(deployed_site, tmp_path):
    """Flipping every deployment label moves only the deploy-* scores: nothing was fitted on them."""
    first = _evaluate(deployed_site, tmp_path, "a")  # passed the egress whitelist
    assert first["n-deploy-eval"] == 14 and all(f"ece-deploy-{m}" in first for m in ("none", "labelled", "oracle"))
    path = deployed_site / AUDIT_FILE
    rows = list(csv.DictReader(path.open()))
    flipped = [{**r, "label": str(1 - int(r["label"]))} for r in rows]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(flipped)
    second = _evaluate(deployed_site, tmp_path, "b")
    scoring = {k for k in first if "deploy" in k}
    assert {k: v for k, v in first.items() if k not in scoring} == {k: v for k, v in second.items()
                                                                     if k not in scoring}
    assert first["prior-deploy-oracle"] == pytest.approx(1 - second["prior-deploy-oracle"])
    assert first["brier-deploy-none"] != second["brier-deploy-none"]
