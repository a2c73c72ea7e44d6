"""`fedrad predict` / `evaluate` of a survival model at the site: risks with covariates, risk groups, scores."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.predict import read_site_folder
from fedrad.client.site_model import Posteriors, RunModel, SiteModel
from fedrad.client.survival_predict import evaluate_risks, score_risks, survival_card, write_risks
from fedrad.client.survival_site import survival_scores
from fedrad.common.config import RunConfig
from fedrad.common.model import build_model
from fedrad.common.preprocess import Preprocessor
from fedrad.lab.series_export import write_seg, write_series

SPACING = (2.5, 0.8, 0.8)


def _site(tmp_path: Path) -> Path:
    """Six lesions of growing size: four with time + event (train, train, test, test, ...), one new patient."""
    site = tmp_path / "site"
    k, r, c = np.mgrid[0:12, 0:40, 0:48]
    rows = ["series,mask,split,time,event"]
    for i, (split, time, event) in enumerate([("train", 900, 1), ("train", 300, 1), ("train", 500, 0),
                                              ("test", 700, 1), ("test", 200, 1), ("train", "", "")]):
        radius = 4.0 + i
        mask = ((k - 5.5) / 3.0) ** 2 + ((r - 20) / radius) ** 2 + ((c - 24) / radius) ** 2 < 1
        hu = np.where(mask, 50.0 + 10 * i, -40.0).astype(np.float32)
        written = write_series(site / "ct" / f"p{i}", hu, SPACING, origin_mm=(-20.0, -16.0, 10.0))
        write_seg(site / f"p{i}.seg.dcm", written, mask)
        rows.append(f"ct/p{i},p{i}.seg.dcm,{split},{time},{event}")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    return site


def test_risks_add_the_covariate_term_the_cut_is_the_training_median_and_scores_match_the_site(tmp_path):
    cfg = RunConfig(task="survival", covariates="log-volume", spacing_mm=1.0, fov_mm=24.0)
    model = build_model(cfg)
    with torch.no_grad():
        model._covariates.weight.fill_(0.7)
    model.eval()
    site = SiteModel(cfg, model, Posteriors(prior_train=np.array([0.5, 0.5])),
                     RunModel(tmp_path / "run", "r1", 5, cfg.to_run_config(), {}, {}), "site s, round 5", "s")
    folder = read_site_folder(_site(tmp_path), Preprocessor(spacing_mm=1.0, fov_mm=24.0, target="survival"))
    everything = score_risks(site, folder)
    assert everything.images == ["ct/p0", "ct/p1", "ct/p2", "ct/p3", "ct/p4", "ct/p5"]  # train, test, new patient
    assert everything.splits == ["train", "train", "train", "test", "test", "train"]
    assert np.isnan(everything.time[5]) and everything.event[5] == -1  # the new patient has neither
    data = folder.data
    z = np.concatenate([data.covariates_train, data.covariates_test, data.covariates_unlabelled])[:, 0]
    network = np.concatenate([site.outputs(x)[0][:, 0] for x in (data.x_train, data.x_test, data.x_unlabelled)])
    np.testing.assert_allclose(everything.risk, network + 0.7 * z, rtol=1e-5, atol=1e-6)
    assert np.ptp(z) > 0.5  # the lesions differ in volume, so the covariate term matters
    assert everything.cut == pytest.approx(np.median(everything.risk[:3]))  # the timed training rows only

    test = everything.only("test")
    assert test.images == ["ct/p3", "ct/p4"] and test.cut == everything.cut
    with pytest.raises(ValueError, match="no readable image in split 'test'"):
        everything.only("train").only("test", "s")
    result = evaluate_risks(everything, "test")
    reference = survival_scores(everything.time[:3], everything.event[:3], everything.risk[:3],
                                everything.time[3:5], everything.event[3:5], everything.risk[3:5])
    assert result["c_index"] == reference["c-index"] and result["n_images"] == 2 and result["n_events"] == 2
    assert sum(result["pairs"].values()) == 1  # one comparable pair: 200 d (event) before 700 d

    path = write_risks(tmp_path / "out", everything, model_sha256="abc")
    rows = list(csv.DictReader(path.open()))
    assert [r["image"] for r in rows] == everything.images
    new = rows[5]
    assert (new["time"], new["event"]) == ("", "") and float(new["risk"]) == pytest.approx(everything.risk[5])
    assert {r["risk_group"] for r in rows} <= {"high", "low"}
    assert [r["risk_group"] for r in rows] == ["high" if v > everything.cut else "low" for v in everything.risk]
    assert [r["risk_group"] for r in rows[:3]].count("high") == 1  # the median of three: one above it

    card = survival_card({"run_id": "r1", "prior": {}, "calibration": None, "decision": {}, "outputs": {}}, site)
    assert card["task"] == "survival" and card["covariates"] == {"names": ["log-volume"], "beta": [pytest.approx(0.7)]}
    assert "prior" not in card and "decision" not in card and "beta . z" in card["outputs"]["risk"]


def test_a_folder_without_training_times_has_no_cut_and_evaluate_needs_times(tmp_path):
    cfg = RunConfig(task="survival", spacing_mm=1.0, fov_mm=24.0)
    model = build_model(cfg).eval()
    site = SiteModel(cfg, model, Posteriors(prior_train=np.array([0.5, 0.5])),
                     RunModel(tmp_path / "run", "r1", 5, cfg.to_run_config(), {}, {}), "pooled")
    folder_dir = _site(tmp_path)
    text = (folder_dir / "labels.csv").read_text().splitlines()
    new = [",".join(r.split(",")[:2]) + ",train,," for r in text[1:]]  # new patients only: no time, no event
    (folder_dir / "labels.csv").write_text("\n".join([text[0], *new]) + "\n")
    everything = score_risks(site, read_site_folder(folder_dir, Preprocessor(spacing_mm=1.0, fov_mm=24.0,
                                                                              target="survival")))
    assert len(everything.images) == 6 and math.isnan(everything.cut)
    rows = list(csv.DictReader(write_risks(tmp_path / "out", everything, model_sha256="abc").open()))
    assert {r["risk_group"] for r in rows} == {""}
    with pytest.raises(ValueError, match="no image in split 'all' has a time and an event"):
        evaluate_risks(everything, "all")
