"""Tests for fedrad.client.dataset.load_site: good rows load, each bad row is skipped with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrad.client.dataset import SiteData, SiteDataError, Skipped, load_site
from fedrad.client.labels import LABEL_COLUMNS
from fedrad.common.dicom import read_image
from fedrad.common.preprocess import Preprocessor
from tests.helpers import disk, write_dicom

PRE = Preprocessor(spacing_mm=1.0, fov_mm=16.0)  # 16 x 16 px: fast


def _ct(path: Path, seed: int, spacing: tuple[float, float] = (0.7, 0.7)) -> Path:
    values = disk((32, 32), spacing, 5.0, center_mm=(8.0 + seed, 10.0)) * 1000 + seed * 10
    return write_dicom(path, values.astype(np.int16), slope=1, intercept=-1024, pixel_spacing=spacing)


def _write_csv(site: Path, text: str, encoding: str = "utf-8") -> None:
    site.mkdir(parents=True, exist_ok=True)
    (site / "labels.csv").write_text(text, encoding=encoding)


def _reason(data: SiteData, file: str) -> str:
    matches = [s.reason for s in data.skipped if s.file == file]
    assert len(matches) == 1, (file, data.skipped)
    return matches[0]


def test_site_with_one_of_each_bad_case(tmp_path: Path) -> None:
    site = tmp_path / "hospital_a"
    for i in range(7):
        _ct(site / "scans" / f"ok{i}.dcm", seed=i, spacing=(0.7, 0.7) if i % 2 else (0.5, 0.9))
    (site / "scans" / "corrupt.dcm").write_text("this is not DICOM")
    _ct(tmp_path / "outside.dcm", seed=9)
    _write_csv(site, "\n".join([
        "Image , label,split,roi_x,roi_y,comment",   # header case/whitespace tolerated; extra column
        "scans/ok0.dcm,1,train,10,12,fine",           # line 2
        "scans/ok1.dcm,0.0, TRAIN ,,,",               # 3: centre used
        "scans\\ok2.dcm,1.0,test,,,",                 # 4: backslash path
        "scans/ok3.dcm,,train,,,",                    # 5: unlabelled
        "scans/missing.dcm,1,train,,,",               # 6
        "scans/corrupt.dcm,0,train,,,",               # 7
        "scans/ok4.dcm,2,train,,,",                   # 8: bad label
        "scans/ok4.dcm,1,validation,,,",              # 9: bad split
        "scans/ok5.dcm,,test,,,",                     # 10: test row without label
        "../outside.dcm,1,train,,,",                  # 11: escapes the folder
        "scans/ok0.dcm,0,test,,,",                    # 12: duplicate of line 2
        "scans/ok4.dcm,1,train,abc,3,",               # 13: non-numeric roi
        "scans/ok4.dcm,1,train,5,400,",               # 14: roi outside the 32 x 32 image
        "",                                           # blank line ignored
        "scans/ok6.dcm,0,test,3,4,",                  # 16: good
    ]) + "\n")
    progress: list[tuple[int, int]] = []
    data = load_site(site, PRE, on_progress=lambda done, total: progress.append((done, total)))

    assert data.name == "hospital_a"
    assert data.x_train.shape == (2, 3, 16, 16) and data.x_train.dtype == np.float32
    np.testing.assert_array_equal(data.y_train, [1, 0])
    assert data.y_train.dtype == np.int64
    np.testing.assert_array_equal(data.y_test, [1, 0])
    assert data.x_test.shape == (2, 3, 16, 16)
    assert data.x_unlabelled.shape == (1, 3, 16, 16)
    assert data.spacings_mm.shape == (6, 2)  # ok0-3, ok4 (roi outside), ok6
    assert progress == [(i, 8) for i in range(1, 9)]

    assert "not found" in _reason(data, "scans/missing.dcm") and "line 6" in _reason(data, "scans/missing.dcm")
    assert "not a DICOM" in _reason(data, "scans/corrupt.dcm")
    assert "'2'" in _reason(data, "labels.csv:8") and "line 8" in _reason(data, "labels.csv:8")
    assert "'validation'" in _reason(data, "labels.csv:9")
    assert "no label" in _reason(data, "labels.csv:10")
    assert "inside" in _reason(data, "../outside.dcm")
    assert "duplicate of line 2" in _reason(data, "scans/ok0.dcm")
    assert "'abc'" in _reason(data, "labels.csv:13")
    assert "outside the image" in [s for s in data.skipped if "line 14" in s.reason][0].reason
    assert len(data.skipped) == 9

    summary = data.summary()
    assert summary["n_train"] == 2 and summary["n_test"] == 2 and summary["n_unlabelled"] == 1
    assert summary["n_skipped"] == 9 and summary["skipped"][0] == {
        "file": data.skipped[0].file, "reason": data.skipped[0].reason}

    # roi given -> centred there (x = column, y = row); roi empty -> image centre
    ok0 = read_image(site / "scans" / "ok0.dcm")
    np.testing.assert_array_equal(data.x_train[0], PRE(ok0, (12.0, 10.0)))
    np.testing.assert_array_equal(data.x_train[1], PRE(read_image(site / "scans" / "ok1.dcm")))


def test_roi_columns_absent_uses_centre_and_bom_is_tolerated(tmp_path: Path) -> None:
    site = tmp_path / "b"
    _ct(site / "a.dcm", seed=1)
    _write_csv(site, "image,label,split\na.dcm,1,train\n", encoding="utf-8-sig")
    data = load_site(site, PRE)
    assert data.skipped == []
    np.testing.assert_array_equal(data.x_train[0], PRE(read_image(site / "a.dcm")))


def test_empty_splits_are_empty_arrays(tmp_path: Path) -> None:
    site = tmp_path / "c"
    _write_csv(site, "image,label,split\n")
    data = load_site(site, PRE)
    assert data.x_train.shape == data.x_test.shape == data.x_unlabelled.shape == (0, 3, 16, 16)
    assert data.y_train.shape == data.y_test.shape == (0,)
    assert data.y_train.dtype == np.int64 and data.spacings_mm.shape == (0, 2)


def test_missing_split_column_is_fatal_and_named(tmp_path: Path) -> None:
    site = tmp_path / "d"
    _write_csv(site, "image,label,spilt\na.dcm,1,train\n")
    with pytest.raises(SiteDataError) as info:
        load_site(site, PRE)
    message = str(info.value)
    assert str(site / "labels.csv") in message
    assert "split" in message and "spilt" in message and "image,label,split" in message


def test_missing_labels_csv_is_fatal_and_names_path(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    with pytest.raises(SiteDataError, match=str(tmp_path / "e" / "labels.csv")):
        load_site(tmp_path / "e", PRE)


def test_empty_or_binary_labels_csv_is_fatal(tmp_path: Path) -> None:
    _write_csv(tmp_path / "f", "")
    with pytest.raises(SiteDataError, match="missing required column"):
        load_site(tmp_path / "f", PRE)
    (tmp_path / "f" / "labels.csv").write_bytes(b"\xff\xfe\x00image")
    with pytest.raises(SiteDataError, match="UTF-8"):
        load_site(tmp_path / "f", PRE)


def test_absolute_path_refused(tmp_path: Path) -> None:
    site = tmp_path / "g"
    outside = _ct(tmp_path / "abs.dcm", seed=2)
    _write_csv(site, f"image,label,split\n{outside},1,train\n")
    data = load_site(site, PRE)
    assert data.x_train.shape[0] == 0 and data.skipped[0].file == str(outside)
    assert "relative" in data.skipped[0].reason


def test_public_names() -> None:
    assert LABEL_COLUMNS == ("image", "label", "split", "roi_x", "roi_y", "series", "mask", "roi_name", "time", "event")
    assert Skipped("a", "b") == Skipped("a", "b")
    assert issubclass(SiteDataError, ValueError)


def test_cached_loading_notices_a_changed_file(tmp_path):
    from fedrad.client.loaded_sites import load_site_cached
    from tests.helpers import tiny_site

    folder = tiny_site(tmp_path, name="m", n_patients=12, seed=0, image_size=64, noise_hu=5, manufacturer="GE")
    prep = Preprocessor(spacing_mm=1.0, fov_mm=24.0)
    first = load_site_cached(folder, prep)
    assert load_site_cached(folder, prep) is first  # unchanged folder: remembered
    labels = (folder / "labels.csv").read_text().splitlines()
    (folder / "labels.csv").write_text("\n".join(labels[:-1]) + "\n")  # one row fewer
    again = load_site_cached(folder, prep)
    assert again is not first
    assert len(again.y_train) + len(again.y_test) == len(first.y_train) + len(first.y_test) - 1
