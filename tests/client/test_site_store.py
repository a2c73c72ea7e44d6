"""The site's preprocessed arrays on its own disk: the same arrays back, and never stale ones."""

import os

import numpy as np
import pytest

from fedrad.client import dataset, loaded_sites, site_store
from fedrad.client.dataset import load_site
from fedrad.client.loaded_sites import load_site_cached
from fedrad.common.preprocess import Preprocessor
from tests.helpers import tiny_site

PREP = Preprocessor(spacing_mm=1.0, fov_mm=24.0)


@pytest.fixture()
def folder(tmp_path):
    site = tiny_site(tmp_path / "data", name="s", n_patients=12, seed=0, image_size=64, noise_hu=5, manufacturer="GE")
    (site / "images" / "extra.dcm").write_bytes(b"not a dicom")  # a bad file is recorded as skipped
    with open(site / "labels.csv", "a") as f:
        f.write("images/extra.dcm,1,train\n")
    return site


def fresh_process() -> None:
    """What a new process (a Deployment Engine message, another actor) starts from."""
    loaded_sites._LOADED.clear()
    dataset._DECODED.clear()


def test_a_new_process_loads_the_same_arrays_without_reading_dicom(folder, tmp_path, monkeypatch):
    cache = tmp_path / "work" / "cache"
    first = load_site_cached(folder, PREP, cache_dir=cache)
    assert len(list(cache.glob("pixels-*.npz"))) == 1
    fresh_process()
    monkeypatch.setattr(dataset, "read_image", lambda path: pytest.fail(f"decoded {path} again"))
    again = load_site_cached(folder, PREP, cache_dir=cache)
    for name in ("x_train", "y_train", "x_test", "y_test", "x_unlabelled", "spacings_mm"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert (again.keys_train, again.keys_test, again.keys_unlabelled) == (first.keys_train, first.keys_test,
                                                                           first.keys_unlabelled)
    assert again.skipped == first.skipped and any("extra.dcm" in s.file for s in again.skipped)
    assert (again.name, again.preprocessing) == (first.name, first.preprocessing)


def test_a_changed_file_or_setting_reads_the_folder_again(folder, tmp_path):
    cache = tmp_path / "cache"
    first = load_site_cached(folder, PREP, cache_dir=cache)
    image = sorted((folder / "images").glob("*.dcm"))[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: maybe a new scan
    fresh_process()
    assert load_site_cached(folder, PREP, cache_dir=cache) is not first
    other = Preprocessor(spacing_mm=0.8, fov_mm=24.0)
    assert load_site_cached(folder, other, cache_dir=cache).x_train.shape[-1] == other.size
    assert len(list(cache.glob("pixels-*.npz"))) == site_store.KEEP  # the oldest went


def test_a_torn_file_is_ignored_with_a_warning(folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    load_site_cached(folder, PREP, cache_dir=cache)
    (path,) = cache.glob("pixels-*.npz")
    path.write_bytes(path.read_bytes()[:1000])
    fresh_process()
    again = load_site_cached(folder, PREP, cache_dir=cache)
    np.testing.assert_array_equal(again.x_train, load_site(folder, PREP).x_train)
    assert "unreadable array file" in caplog.text and str(path) in caplog.text
