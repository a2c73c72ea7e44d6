"""`fedrad synth --kind series`: series, masks in three formats, survival labels and truth (tiny volumes)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedrad.client.dataset import load_site
from fedrad.client.series import read_series
from fedrad.common.preprocess import Preprocessor
from fedrad.lab.synth_series import default_series_sites, draw_patient, generate_series, true_risk


def _tiny(n: int = 5) -> list:
    return [dataclasses.replace(s, n_patients=n, size_px=40, n_slices=max(24, s.n_slices // 2))
            for s in default_series_sites()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("series")
    generate_series(out, sites=_tiny(), seed=3)
    return out


def test_sites_differ_in_thickness_mask_format_and_compression(data: Path) -> None:
    import pydicom

    truth = {s["name"]: s for s in json.loads((data / "truth.json").read_text())["sites"]}
    assert sorted({s["slice_mm"] for s in truth.values()}) == [1.25, 2.5, 5.0]
    assert sorted(s["mask_format"] for s in truth.values()) == ["nifti", "rtstruct", "seg"]
    for name, spec in truth.items():
        rows = list(csv.DictReader(open(data / name / "labels.csv")))
        assert len(rows) == 5 and {r["split"] for r in rows} <= {"train", "test"}
        assert all(float(r["time"]) > 0 and r["event"] in ("0", "1") and r["label"] in ("0", "1") for r in rows)
        volume = read_series(data / name / rows[0]["series"])
        assert 24 <= volume.values.shape[0] <= 64 and volume.spacing_mm[0] == spec["slice_mm"]
        first = sorted((data / name / rows[0]["series"]).iterdir())[0]
        syntax = pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert syntax.is_compressed == spec["compress"]
    assert [s["compress"] for s in truth.values()].count(True) == 1


def test_every_site_loads_for_survival_and_classification(data: Path) -> None:
    for name in ("site-a", "site-b", "site-c"):
        rows = list(csv.DictReader(open(data / name / "labels.csv")))
        survival = load_site(data / name, Preprocessor(spacing_mm=1.0, fov_mm=32.0, target="survival"))
        labels = load_site(data / name, Preprocessor(spacing_mm=1.0, fov_mm=32.0, slice_mode="2.5d"))
        assert survival.skipped == [] and labels.skipped == []
        train = [r for r in rows if r["split"] == "train"]
        np.testing.assert_array_equal(survival.time_train, [float(r["time"]) for r in train])
        np.testing.assert_array_equal(survival.y_train, [int(r["event"]) for r in train])
        np.testing.assert_array_equal(labels.y_train, [int(r["label"]) for r in train])
        assert len(labels.time_train) == 0


def test_truth_records_coefficients_and_a_ceiling_from_the_true_risk(data: Path) -> None:
    truth = json.loads((data / "truth.json").read_text())
    assert set(truth["risk_model"]["features"]) == {"log_volume_mm3", "lobulation", "texture_sd_hu"}
    for site in truth["sites"]:
        ceiling = site["c_index_ceiling_all"]
        assert ceiling is None or 0.0 <= ceiling <= 1.0


def test_risk_grows_with_the_visible_malignancy_score() -> None:
    site = dataclasses.replace(default_series_sites()[2], size_px=40)
    low = [true_risk(draw_patient(np.random.default_rng(i), -1.5, site)[2]) for i in range(12)]
    high = [true_risk(draw_patient(np.random.default_rng(i), 1.5, site)[2]) for i in range(12)]
    assert np.mean(high) > np.mean(low) + 0.5


def test_same_seed_same_pixels_and_labels(tmp_path: Path) -> None:
    sites = [dataclasses.replace(_tiny(2)[2])]
    generate_series(tmp_path / "a", sites=sites, seed=1)
    generate_series(tmp_path / "b", sites=sites, seed=1)
    assert (tmp_path / "a/site-c/labels.csv").read_text() == (tmp_path / "b/site-c/labels.csv").read_text()
    np.testing.assert_array_equal(read_series(tmp_path / "a/site-c/ct/site-c-0001").values,
                                  read_series(tmp_path / "b/site-c/ct/site-c-0001").values)
