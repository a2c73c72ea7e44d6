"""Tests for the synthetic multi-center CT generator (fedrad.lab.synth)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from skimage import measure

from fedrad.client.deploy_eval import AUDIT_FILE
from fedrad.lab.synth import (
    SiteSpec,
    _assign_deployment,
    _assign_labels,
    _write_dicom,
    default_sites,
    generate,
    legacy_sites,
    render_slice,
)
from fedrad.lab.synth_lesion import lesion_alpha, sample_lesion

TINY = [
    SiteSpec("s1", 12, 0.5, 0.6, 10.0, "smooth", 0.0, "Siemens"),
    SiteSpec("s2", 12, 0.4, 1.0, 20.0, "sharp", 20.0, "Canon", unlabelled_fraction=0.25, rescale_slope=0.5),
]
HEADER = ["image", "label", "split", "roi_x", "roi_y"]


def _rows(folder: Path, index: str = "labels.csv") -> list[dict[str, str]]:
    with open(folder / index, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[tuple[str, int]]]:
    root = tmp_path_factory.mktemp("synth")
    calls: list[tuple[str, int]] = []
    folders = generate(root, sites=TINY, seed=3, image_size=96, on_site_done=lambda n, k: calls.append((n, k)))
    return root, folders, calls


def test_layout_and_progress_hook(tiny: tuple[Path, list[Path], list[tuple[str, int]]]) -> None:
    root, folders, calls = tiny
    assert folders == [root / "s1", root / "s2"]
    assert calls == [("s1", 12), ("s2", 12)]
    for folder in folders:
        assert len(list((folder / "images").glob("*.dcm"))) == 12


def test_dicom_files_are_valid_ct(tiny: tuple[Path, list[Path], list[tuple[str, int]]]) -> None:
    root, _, _ = tiny
    for spec in TINY:
        for row in _rows(root / spec.name):
            path = root / spec.name / row["image"]
            assert path.read_bytes()[128:132] == b"DICM"  # preamble + prefix: a real Part 10 file
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" == ds.file_meta.MediaStorageSOPClassUID
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            assert ds.Modality == "CT" and ds.Manufacturer == spec.manufacturer
            assert ds.PatientID == Path(row["image"]).stem
            assert (ds.Rows, ds.Columns) == (96, 96) and ds.SamplesPerPixel == 1
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 0)
            assert [float(v) for v in ds.PixelSpacing] == [spec.spacing_mm] * 2
            assert float(ds.RescaleSlope) == spec.rescale_slope and ds.RescaleType == "HU"
            assert ds.ConvolutionKernel and len(ds.ImageOrientationPatient) == 6
            for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SliceThickness", "WindowCenter",
                        "WindowWidth", "ImagePositionPatient", "StudyDate", "PatientName"):
                assert tag in ds, tag
            hu = apply_modality_lut(ds.pixel_array, ds)
            col, row_px = round(float(row["roi_x"])), round(float(row["roi_y"]))
            assert -300 < hu[row_px - 1:row_px + 2, col - 1:col + 2].mean() < 300  # soft-tissue lesion
            assert -950 < np.median(hu) < -700  # mostly lung parenchyma
            if spec.rescale_slope == 0.5:  # stored integers are not HU
                assert abs(np.median(ds.pixel_array) - 2 * (np.median(hu) + 1024)) < 2


@pytest.mark.parametrize("slope, intercept", [(1.0, -1024.0), (0.5, -1024.0), (1.0, 0.0)])
def test_modality_lut_reproduces_hu(tmp_path: Path, slope: float, intercept: float) -> None:
    site = SiteSpec("x", 1, 0.5, 0.8, 0.0, "smooth", 0.0, "GE", rescale_slope=slope, rescale_intercept=intercept)
    hu = np.random.default_rng(0).uniform(-1024.0, 1500.0, size=(40, 40))
    _write_dicom(tmp_path / "x.dcm", hu, site, "x-0001", seed=0, z_mm=-100.0)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    assert ds.PixelRepresentation == (1 if intercept > -1024 else 0)
    assert np.abs(apply_modality_lut(ds.pixel_array, ds) - hu).max() <= slope / 2 + 1e-9


def test_labels_csv_format(tiny: tuple[Path, list[Path], list[tuple[str, int]]]) -> None:
    root, _, _ = tiny
    for spec in TINY:
        with open(root / spec.name / "labels.csv", newline="", encoding="utf-8") as fh:
            assert next(csv.reader(fh)) == HEADER
        rows = _rows(root / spec.name)
        assert len(rows) == spec.n_patients
        for row in rows:
            assert (root / spec.name / row["image"]).is_file() and row["image"].startswith("images/")
            assert row["split"] in ("train", "test") and row["label"] in ("0", "1", "")
            assert row["split"] == "train" or row["label"] != ""  # test rows always labelled
            for key in ("roi_x", "roi_y"):
                assert len(row[key].split(".")[1]) == 1 and 0 <= float(row[key]) < 96
        test_labels = {r["label"] for r in rows if r["split"] == "test"}
        assert test_labels == {"0", "1"}  # stratified: both classes in test
    s2 = _rows(root / "s2")
    assert sum(r["label"] == "" for r in s2) == round(0.25 * sum(r["split"] == "train" for r in s2))


def test_truth_json(tiny: tuple[Path, list[Path], list[tuple[str, int]]]) -> None:
    root, _, _ = tiny
    truth = json.loads((root / "truth.json").read_text())
    assert truth["seed"] == 3 and [s["name"] for s in truth["sites"]] == ["s1", "s2"]
    for spec, entry in zip(TINY, truth["sites"]):
        rows = _rows(root / spec.name)
        spec_fields = {k: v for k, v in dataclasses.asdict(spec).items() if not k.startswith(("n_deploy", "deploy_"))}
        assert {k: entry[k] for k in spec_fields} == spec_fields
        assert not any(k.startswith(("n_deploy", "deploy_", "prior_deploy")) for k in entry)  # as before shift existed
        assert entry["n_test"] == sum(r["split"] == "test" for r in rows)
        assert entry["n_train"] + entry["n_test"] == spec.n_patients
        assert entry["n_unlabelled"] == sum(r["label"] == "" for r in rows)
        assert 0 <= entry["prior_true"] <= 1


def test_prevalence_and_stratified_split(tmp_path: Path) -> None:
    generate(tmp_path, sites=[SiteSpec("big", 200, 0.3, 1.0, 10.0, "smooth", 0.0, "GE")], seed=1, image_size=32)
    rows = _rows(tmp_path / "big")
    assert abs(np.mean([r["label"] == "1" for r in rows]) - 0.3) <= 0.08
    for c in ("0", "1"):  # per-class test fraction ~ 0.3
        n_c = sum(r["label"] == c for r in rows)
        n_test = sum(r["label"] == c and r["split"] == "test" for r in rows)
        assert abs(n_test / n_c - 0.3) < 0.03


def test_label_threshold_flips_borderline_cases() -> None:
    base = SiteSpec("big", 2000, 0.5, 1.0, 10.0, "smooth", 0.0, "GE")
    label0, score0, _, _ = _assign_labels(base, np.random.default_rng(0))
    for t in (0.7, -0.7):
        label, score, _, _ = _assign_labels(dataclasses.replace(base, label_threshold=t), np.random.default_rng(0))
        np.testing.assert_array_equal(score, score0)
        band = (score > min(0, t)) & (score <= max(0, t))
        np.testing.assert_array_equal(label[~band], label0[~band])  # only the band changes
        np.testing.assert_array_equal(label[band], (score[band] > t).astype(int))
        assert (label.mean() < label0.mean() - 0.03) if t > 0 else (label.mean() > label0.mean() + 0.03)


def test_default_sites_differ_and_have_five_test_cases_per_class() -> None:
    sites = default_sites()
    assert len(sites) == 5 and all(s.n_patients >= 50 for s in sites)
    assert len({s.spacing_mm for s in sites}) == 5 and {s.kernel for s in sites} == {"smooth", "sharp"}
    assert len({s.hu_offset for s in sites}) == 5 and len({s.prevalence for s in sites}) == 5
    assert [s.name for s in sites if s.label_threshold != 0] == ["site-e"]  # the concept-shift site
    for s in sites:
        label, _, is_test, _ = _assign_labels(s, np.random.default_rng(0))
        assert all(np.sum(is_test & (label == c)) >= 5 for c in (0, 1)), s.name


def test_default_label_shift_sites_have_hundreds_of_unlabelled_and_test_images() -> None:
    for s in legacy_sites():
        _, _, is_test, unlabelled = _assign_labels(s, np.random.default_rng(0))
        if s.unlabelled_fraction:
            assert unlabelled.sum() >= 300 and is_test.sum() >= 300, s.name
        if s.prevalence >= 0.85:  # the strongly shifted site: ECE gains there must stand above estimation noise
            assert unlabelled.sum() >= 900 and is_test.sum() >= 600, s.name


def test_default_data_shifts_the_prior_at_deployment_at_two_sites() -> None:
    shifted = [s for s in default_sites() if s.deploy_prevalence is not None
               and abs(s.deploy_prevalence - s.prevalence) >= 0.25]
    assert len(shifted) >= 2
    for s in shifted:
        label, _, is_eval = _assign_deployment(s, np.random.default_rng(0))
        pool, evaluation = label[~is_eval], label[is_eval]
        assert pool.size == s.n_deploy >= 300 and evaluation.size == s.n_deploy_eval >= 300, s.name
        assert abs(pool.mean() - s.deploy_prevalence) < 0.01 and abs(evaluation.mean() - s.deploy_prevalence) < 0.01
        lab, _, is_test, unlabelled = _assign_labels(s, np.random.default_rng(0))
        assert not unlabelled.any() and abs(lab.mean() - s.prevalence) < 0.01  # labels only of the labelled population
        assert (~is_test).sum() >= 300 and is_test.sum() >= 300, s.name
    # everything else is the legacy federation unchanged
    strip = ("n_patients", "test_fraction", "unlabelled_fraction", "n_deploy", "n_deploy_eval", "deploy_prevalence")
    same = [{k: v for k, v in dataclasses.asdict(s).items() if k not in strip} for s in default_sites()]
    assert same == [{k: v for k, v in dataclasses.asdict(s).items() if k not in strip} for s in legacy_sites()]


def test_deployment_population_is_written_apart_from_the_labels(tmp_path: Path) -> None:
    spec = SiteSpec("d", 30, 0.2, 0.8, 5.0, "smooth", 0.0, "GE", n_deploy=20, n_deploy_eval=16, deploy_prevalence=0.75)
    generate(tmp_path, sites=[spec], seed=2, image_size=32)
    rows, audit = _rows(tmp_path / "d"), _rows(tmp_path / "d", AUDIT_FILE)
    labelled = [r for r in rows if r["label"] != ""]
    unlabelled = [r for r in rows if r["label"] == ""]
    assert len(labelled) == 30 and len(unlabelled) == 20 and len(audit) == 16
    assert {r["image"] for r in audit}.isdisjoint(r["image"] for r in rows)  # eval images never in labels.csv
    assert all((tmp_path / "d" / r["image"]).is_file() for r in audit) and {r["split"] for r in audit} == {"test"}
    assert np.mean([r["label"] == "1" for r in audit]) == 12 / 16
    truth = json.loads((tmp_path / "truth.json").read_text())["sites"][0]
    assert truth["prior_labelled_true"] == np.mean([r["label"] == "1" for r in labelled]) == 6 / 30
    assert truth["prior_deploy_true"] == 27 / 36 and truth["prior_deploy_eval_true"] == 12 / 16
    assert truth["prior_unlabelled_true"] == 15 / 20 and truth["n_unlabelled"] == 20
    # written again as a site without deployment images: the stale audit file goes, labels.csv is the old kind
    generate(tmp_path, sites=[dataclasses.replace(spec, n_deploy=0, n_deploy_eval=0, deploy_prevalence=None)],
             seed=2, image_size=32)
    assert not (tmp_path / "d" / AUDIT_FILE).exists() and len(_rows(tmp_path / "d")) == 30


def test_a_site_without_deployment_is_drawn_as_before_it_existed(tmp_path: Path) -> None:
    """The labelled population's files do not depend on whether deployment patients follow them."""
    base = SiteSpec("d", 14, 0.3, 0.8, 5.0, "smooth", 0.0, "GE", unlabelled_fraction=0.0)
    generate(tmp_path / "a", sites=[base], seed=4, image_size=32)
    generate(tmp_path / "b", sites=[dataclasses.replace(base, n_deploy=5, n_deploy_eval=3, deploy_prevalence=0.9)],
             seed=4, image_size=32)
    a, b = _tree_bytes(tmp_path / "a" / "d"), _tree_bytes(tmp_path / "b" / "d")
    assert all(b[k] == v for k, v in a.items() if k.endswith(".dcm"))
    assert _rows(tmp_path / "b" / "d")[:14] == _rows(tmp_path / "a" / "d")


def test_truth_records_the_prior_of_the_unlabelled_images(tmp_path: Path) -> None:
    spec = SiteSpec("u", 40, 0.5, 0.8, 5.0, "smooth", 0.0, "GE", unlabelled_fraction=0.5)
    generate(tmp_path, sites=[spec, TINY[0]], seed=3, image_size=64)
    truth = json.loads((tmp_path / "truth.json").read_text())["sites"]
    with open(tmp_path / "u" / "labels.csv", newline="") as fh:
        n_unlabelled = sum(1 for row in csv.DictReader(fh) if row["label"] == "")
    assert truth[0]["n_unlabelled"] == n_unlabelled > 0 and 0 <= truth[0]["prior_unlabelled_true"] <= 1
    assert truth[1]["prior_unlabelled_true"] is None  # no unlabelled rows


def test_determinism(tmp_path: Path) -> None:
    site = [TINY[1]]
    generate(tmp_path / "a", sites=site, seed=7, image_size=64)
    generate(tmp_path / "b", sites=site, seed=7, image_size=64)
    generate(tmp_path / "c", sites=site, seed=8, image_size=64)
    a, b, c = (_tree_bytes(tmp_path / k) for k in "abc")
    assert a == b
    dcm = [k for k in a if k.endswith(".dcm")]
    assert all(a[k] != c[k] for k in dcm)
    ds_a, ds_c = (pydicom.dcmread(tmp_path / k / dcm[0]) for k in "ac")
    assert not np.array_equal(ds_a.pixel_array, ds_c.pixel_array)


def _compactness(alpha: np.ndarray, spacing_mm: float) -> float:
    mask = alpha > 0.5
    return float((measure.perimeter(mask) * spacing_mm) ** 2 / (4 * np.pi * mask.sum() * spacing_mm**2))


def test_class_cue_is_shape_and_texture_not_mean_hu() -> None:
    stats: dict[int, list[tuple[float, float, float]]] = {0: [], 1: []}
    for i in range(60):
        y = i % 2
        rng = np.random.default_rng([11, i])
        score = rng.normal(1.0 if y else -1.0, 0.8)
        hu, alpha, _ = render_slice(rng, score, 0.7, 96)
        core = alpha >= 0.999
        stats[y].append((hu[core].mean(), hu[core].std(), _compactness(alpha, 0.7)))
    ben, mal = np.array(stats[0]), np.array(stats[1])
    assert abs(mal[:, 0].mean() - ben[:, 0].mean()) < 15  # no mean-intensity cue (HU, pre-noise)
    assert mal[:, 1].mean() > 1.5 * ben[:, 1].mean()  # heterogeneous interior
    assert mal[:, 2].mean() > ben[:, 2].mean() + 0.3  # irregular margin (perimeter^2 / 4 pi area)


def test_spacing_is_physical() -> None:
    shape = sample_lesion(np.random.default_rng(2), 0.0, extent_mm=96.0)
    fine, coarse = lesion_alpha(shape, 0.6, 160), lesion_alpha(shape, 1.0, 96)  # same 96 mm field
    assert fine.sum() / coarse.sum() == pytest.approx((1.0 / 0.6) ** 2, rel=0.05)
    assert fine.sum() * 0.36 == pytest.approx(coarse.sum() * 1.0, rel=0.05)  # same area in mm^2
    assert fine.sum() * 0.36 == pytest.approx(np.pi * shape.radius_mm**2, rel=0.3)


@pytest.mark.parametrize(
    "field, value",
    [("prevalence", 1.5), ("prevalence", -0.1), ("n_patients", 0), ("kernel", "soft"),
     ("spacing_mm", 0.0), ("noise_hu", -1.0), ("test_fraction", 1.0), ("rescale_slope", 0.0),
     ("unlabelled_fraction", 2.0), ("name", "a/b"), ("n_deploy", -1), ("n_deploy_eval", 1.5),
     ("deploy_prevalence", 1.2)],
)
def test_bad_site_spec_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY[0], **{field: value})


def test_bad_generate_arguments_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        generate(tmp_path, sites=[TINY[0], TINY[0]])
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path, sites=TINY, seed=-1)
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path, sites=TINY, image_size=8)
