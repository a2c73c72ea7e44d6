"""Mask covariates beside the CNN in the Cox head (run config `covariates`): read, trained, shared, refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client import site_store
from fedrad.client.dataset import load_site
from fedrad.client.features import site_inputs
from fedrad.client.survival_site import fit_survival, risk_scores, site_covariates
from fedrad.common.config import RunConfig
from fedrad.common.covariates import COVARIATES, asphericity, hu_sd, log_volume_ml, parse_covariates, select
from fedrad.common.finetune import CLASSIFIER_LEVEL, param_groups, shared_keys
from fedrad.common.model import build_model
from fedrad.common.preprocess import Preprocessor
from fedrad.common.survival import pair_counts
from fedrad.lab.series_export import write_seg, write_series
from tests.helpers import array_site

CPU = torch.device("cpu")
SPACING = (2.5, 0.8, 0.8)


def test_log_volume_is_voxels_times_voxel_size_in_ml_and_nan_for_an_empty_mask() -> None:
    mask = np.zeros((10, 20, 20), bool)
    mask[:5, :10, :10] = True  # 500 voxels of 2 mm^3 = 1 mL
    assert log_volume_ml(mask, (2.0, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-12)
    assert log_volume_ml(mask, (2.0, 2.0, 1.0)) == pytest.approx(math.log(2.0))
    assert math.isnan(log_volume_ml(np.zeros_like(mask), (1.0, 1.0, 1.0)))


def test_asphericity_grows_with_a_lobulated_margin_and_hu_sd_is_in_100_hu() -> None:
    k, r, c = np.mgrid[0:40, 0:40, 0:40] - 19.5
    rho = np.sqrt(k ** 2 + r ** 2 + c ** 2)
    ball = rho < 12
    polar = np.arccos(np.clip(k / np.maximum(rho, 1e-9), -1, 1))
    bumpy = rho < 12 * (1 + 0.25 * np.sin(5 * np.arctan2(r, c)) * np.sin(4 * polar))
    assert 0 <= asphericity(ball, (1.0, 1.0, 1.0)) < 1.0  # a voxelised ball: sphericity above 0.9
    assert asphericity(bumpy, (1.0, 1.0, 1.0)) > asphericity(ball, (1.0, 1.0, 1.0)) + 0.5
    unit, double = asphericity(ball, (1.0, 1.0, 1.0)), asphericity(ball, (2.0, 2.0, 2.0))
    assert unit == pytest.approx(double, abs=1e-5)  # scale-free
    assert math.isnan(asphericity(np.zeros_like(ball), (1.0, 1.0, 1.0)))
    values = np.where(ball, 40.0, -900.0)
    values[ball & (c > 0)] = 240.0  # half the lesion at 40 HU, half at 240: sd 100 HU
    assert hu_sd(values, ball) == pytest.approx(1.0, abs=0.02)
    assert math.isnan(hu_sd(values, np.zeros_like(ball)))


def test_covariates_are_named_checked_and_only_for_survival() -> None:
    assert parse_covariates("") == () and parse_covariates(" log-volume ") == ("log-volume",)
    for bad in ("volume", "log-volume,log-volume"):
        with pytest.raises(ValueError, match="covariates must be"):
            parse_covariates(bad)
    with pytest.raises(ValueError, match="covariates must be"):
        RunConfig(task="survival", covariates="sphericity")
    with pytest.raises(ValueError, match="need task = survival"):
        RunConfig(covariates="log-volume")
    with pytest.raises(ValueError, match="covariate-lr must be > 0"):
        RunConfig(task="survival", covariates="log-volume", covariate_lr=0.0)
    assert RunConfig(task="survival", covariates="log-volume").covariate_names == ("log-volume",)
    assert RunConfig.from_run_config({"task": "survival", "covariates": "log-volume"}).covariates == "log-volume"


def test_a_row_without_a_mask_is_refused_by_count_and_site_never_by_file() -> None:
    values = np.array([[0.1, 2.0, 0.5], [np.nan, np.nan, np.nan], [0.3, 1.0, 0.7]])
    with pytest.raises(ValueError, match=r"site site-x: covariates log-volume need .* 1 of 3 rows have none"):
        select(values, ("log-volume",), site="site-x")
    np.testing.assert_array_equal(select(values[[0, 2]], ("log-volume",)), [[0.1], [0.3]])
    np.testing.assert_array_equal(select(values[[0, 2]], ("hu-sd", "log-volume")), [[0.5, 0.1], [0.7, 0.3]])


def test_the_coefficients_start_at_zero_are_shared_and_train_at_their_own_rate() -> None:
    cfg = RunConfig(task="survival", covariates="log-volume", covariate_lr=0.2, lr_max=0.003)
    model = build_model(cfg)
    plain = build_model(cfg.replace(covariates=""))
    assert model._covariates.weight.shape == (1, 1) and not model._covariates.weight.detach().any()
    assert shared_keys(model) == [*shared_keys(plain), "_covariates.weight"]  # averaged like the head
    groups = param_groups(model, lr_max=cfg.lr_max, lr_decay=cfg.lr_decay, covariate_lr=cfg.covariate_lr)
    beta = [g for g in groups if "_covariates.weight" in g.names]
    assert len(beta) == 1 and beta[0].names == ("_covariates.weight",) and beta[0].lr == 0.2
    assert beta[0].level == CLASSIFIER_LEVEL
    head = [g for g in groups if "_fc.weight" in g.names]
    assert head[0].lr == pytest.approx(0.003) and "_covariates.weight" not in head[0].names


def test_a_series_row_carries_its_mask_volume_and_it_survives_the_array_store(tmp_path: Path) -> None:
    k, r, c = np.mgrid[0:12, 0:40, 0:48]
    mask = ((k - 5.3) / 3.0) ** 2 + ((r - 18) / 6.0) ** 2 + ((c - 22) / 8.0) ** 2 < 1
    hu = np.where(mask, 60.0, -40.0).astype(np.float32)
    site = tmp_path / "site"
    written = write_series(site / "ct" / "p1", hu, SPACING, origin_mm=(-20.0, -16.0, 10.0))
    write_seg(site / "p1.seg.dcm", written, mask)
    flat = sorted((site / "ct" / "p1").iterdir())[5]
    (site / "flat.dcm").write_bytes(flat.read_bytes())
    (site / "labels.csv").write_text("image,series,mask,split,time,event\n,ct/p1,p1.seg.dcm,train,300,1\n"
                                     "flat.dcm,,,train,200,0\n")
    pre = Preprocessor(spacing_mm=1.0, fov_mm=24.0, target="survival")
    data = load_site(site, pre)
    assert data.covariates_train.shape == (2, len(COVARIATES))
    expected = math.log(mask.sum() * np.prod(SPACING) / 1000.0)
    assert data.covariates_train[0, 0] == pytest.approx(expected, rel=1e-9)
    assert data.covariates_train[0, 2] == pytest.approx(0.0, abs=1e-6)  # a flat lesion (60 HU throughout): sd 0
    assert 0 < data.covariates_train[0, 1] < 10
    assert np.isnan(data.covariates_train[1]).all()  # the 2-D row has no mask
    with pytest.raises(ValueError, match="1 of 2 rows have none"):
        site_covariates(data, RunConfig(task="survival", covariates="log-volume"))
    assert site_covariates(data, RunConfig(task="survival")) == (None, None)
    path = tmp_path / "cache" / "pixels-x.npz"
    site_store.save(path, data)
    np.testing.assert_array_equal(site_store.load(path).covariates_train, data.covariates_train)


def test_the_cox_fit_learns_a_covariate_that_ranks_survival(tmp_path: Path) -> None:
    """Images carry nothing; the event times follow z. beta learns z's sign, and the risk ranks by it."""
    data = array_site(n=40)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(len(data.x_train), 1))
    time = np.exp(-1.5 * z[:, 0] + rng.normal(0, 0.2, len(z))) * 500
    event = np.ones(len(z))
    cfg = RunConfig(freeze_blocks=14, local_epochs=6, batch_size=20, fov_mm=16.0, task="survival",
                    covariates="log-volume", covariate_lr=0.1)
    model = build_model(cfg)
    inputs = site_inputs(model, cfg, data, tmp_path, CPU)
    fit_survival(model, inputs.train, time, event, cfg, seed=1, covariates=z)
    beta = float(model._covariates.weight)
    assert beta > 0.3  # from 0, against the CNN head that sees only noise
    risk = risk_scores(model, np.zeros(len(z)), z)
    assert pair_counts(time, event, risk).c_index > 0.9
    with pytest.raises(ValueError, match="covariates have 3 rows for 40"):
        fit_survival(model, inputs.train, time, event, cfg, seed=1, covariates=z[:3])
    # without covariates the same model trains its network alone and beta stays where it was
    fit_survival(model, inputs.train, time, event, cfg, seed=2)
    assert float(model._covariates.weight) == beta
