"""Slice bag (`slices-per-lesion` k): the k largest lesion sections, one drawn per epoch, k averaged at evaluation."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.cache import MEMORY
from fedrad.client.dataset import load_site
from fedrad.client.features import site_inputs
from fedrad.client.masks import read_mask
from fedrad.client.outputs import model_outputs
from fedrad.client.series import read_series
from fedrad.client.slices import largest_slices, lesion_planes
from fedrad.client.survival_site import fit_survival
from fedrad.client.train import pixel_inputs
from fedrad.common.config import RunConfig
from fedrad.common.model import build_model
from fedrad.common.preprocess import Preprocessor
from fedrad.lab.series_export import write_seg, write_series
from tests.helpers import array_site

CPU = torch.device("cpu")
SPACING = (2.5, 0.8, 0.8)


@pytest.fixture(autouse=True)
def fresh_memory():
    MEMORY.clear()
    yield
    MEMORY.clear()


def test_largest_slices_are_ordered_by_area_and_repeat_when_the_lesion_is_short() -> None:
    mask = np.zeros((10, 8, 8), bool)
    mask[2, :2, :5] = True  # area 10
    mask[5, :6, :5] = True  # 30
    mask[7, :4, :5] = True  # 20
    mask[8, :5, :4] = True  # 20: a tie with slice 7, the lower index first
    assert largest_slices(mask, 1) == [5]
    assert largest_slices(mask, 4) == [5, 7, 8, 2]
    assert largest_slices(mask, 6) == [5, 7, 8, 2, 5, 7]  # only 4 sections: the bag repeats from the largest
    with pytest.raises(ValueError):
        largest_slices(mask, 0)


def _volume(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, list]:
    """An off-centre lesion whose sections shift in plane from slice to slice (each is cropped on its own)."""
    rng = np.random.default_rng(1)
    k, r, c = np.mgrid[0:12, 0:40, 0:48]
    mask = ((k - 5.3) / 3.0) ** 2 + ((r - 18 - k) / 6.0) ** 2 + ((c - 22) / 8.0) ** 2 < 1
    hu = np.round(rng.normal(-50, 15, mask.shape) + 90 * mask + 2 * k).astype(np.float32)
    written = write_series(tmp_path / "site" / "ct" / "p1", hu, SPACING, origin_mm=(-20.0, -16.0, 10.0))
    return hu, mask, written


def test_a_series_row_holds_its_k_largest_sections_each_cropped_like_the_largest(tmp_path: Path) -> None:
    hu, mask, written = _volume(tmp_path)
    site = tmp_path / "site"
    write_seg(site / "p1.seg.dcm", written, mask)
    shutil.copy(sorted((site / "ct" / "p1").iterdir())[5], site / "flat.dcm")
    (site / "labels.csv").write_text("image,series,mask,label,split\n,ct/p1,p1.seg.dcm,1,train\n"
                                     "flat.dcm,,,0,train\n")
    areas = mask.sum(axis=(1, 2))
    expected_order = [int(i) for i in np.argsort(-areas, kind="stable")[:3]]
    volume = read_series(site / "ct" / "p1")
    planes = lesion_planes(volume, read_mask(site / "p1.seg.dcm", volume), mode="largest", slices=3)
    assert [p.values.tolist() for p in planes.images] == [hu[i].tolist() for i in expected_order]
    assert areas[expected_order[0]] >= areas[expected_order[1]] >= areas[expected_order[2]] > 0
    assert len({c for c in planes.centres_rc}) == 3  # each section centred on its own bounding box
    one = Preprocessor(spacing_mm=1.0, fov_mm=24.0, slice_mode="largest")
    bag = Preprocessor(spacing_mm=1.0, fov_mm=24.0, slice_mode="largest", slices_per_lesion=3)
    single, data = load_site(site, one), load_site(site, bag)
    assert data.x_train.shape == (2, 9, 24, 24) and single.x_train.shape == (2, 3, 24, 24)
    np.testing.assert_array_equal(data.x_train[0, :3], single.x_train[0])  # slice 0 is today's input
    for j, (image, centre) in enumerate(zip(planes.images, planes.centres_rc)):  # same fov, same windows
        np.testing.assert_array_equal(data.x_train[0, 3 * j:3 * j + 3], one(image, centre))
    np.testing.assert_array_equal(data.x_train[1], np.tile(single.x_train[1], (3, 1, 1)))  # a 2-D row: k copies
    assert data.keys_train[0] != single.keys_train[0] and data.preprocessing != single.preprocessing


def test_slices_per_lesion_needs_slice_mode_largest() -> None:
    with pytest.raises(ValueError, match="slices-per-lesion"):
        RunConfig(slices_per_lesion=3, slice_mode="2.5d")
    with pytest.raises(ValueError, match="slices_per_lesion"):
        Preprocessor(slice_mode="orthogonal", slices_per_lesion=2)


def _bag_site(k: int, n: int = 12):
    """Array site whose rows hold k different random 'sections'; times and events for a Cox fit."""
    data = array_site(n=n)
    rng = np.random.default_rng(5)
    extra = [rng.normal(size=data.x_train.shape).astype(np.float32) for _ in range(k - 1)]
    x = np.concatenate([data.x_train, *extra], axis=1)
    return dataclasses.replace(data, x_train=x, x_test=x[:4], keys_train=tuple(f"bag{k}-{i}" for i in range(n)),
                               keys_test=tuple(f"bag{k}-{i}" for i in range(4)))


def test_evaluation_averages_the_k_risks_cached_or_not(tmp_path: Path) -> None:
    cfg = RunConfig(freeze_blocks=14, local_epochs=2, batch_size=6, fov_mm=16.0, task="survival", slices_per_lesion=3)
    data = _bag_site(3)
    time = np.linspace(100.0, 1200.0, len(data.x_train))
    event = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], float)
    cached = build_model(cfg)
    inputs = site_inputs(cached, cfg, data, tmp_path, CPU)
    assert inputs.train.n_slices == 3 and inputs.test.n_slices == 3 and inputs.train.n_views == 1
    fit_survival(cached, inputs.train, time, event, cfg, seed=3)
    risk = model_outputs(cached, inputs.test, CPU)[0][:, 0]  # what evaluate_survival and survival_row score
    per_slice = [model_outputs(cached, pixel_inputs(cached, data.x_test[:, 3 * j:3 * j + 3], 1, CPU), CPU)[0][:, 0]
                 for j in range(3)]
    np.testing.assert_allclose(risk, np.mean(per_slice, axis=0), rtol=1e-4, atol=1e-5)
    assert np.ptp(per_slice, axis=0).max() > 1e-3  # the slices differ: a mean, not one slice's risk
    # k copies of one section train exactly the model of that one section: the bag draws from its own
    # generator (order and views as k = 1) and BN over k equal copies is BN over one
    one = dataclasses.replace(data, x_train=data.x_train[:, :3], x_test=data.x_test[:, :3],
                              keys_train=tuple("one" + key for key in data.keys_train),
                              keys_test=tuple("one" + key for key in data.keys_test))
    copies = dataclasses.replace(one, x_train=np.tile(one.x_train, (1, 3, 1, 1)),
                                 x_test=np.tile(one.x_test, (1, 3, 1, 1)),
                                 keys_train=tuple("copies" + key for key in data.keys_train),
                                 keys_test=tuple("copies" + key for key in data.keys_test))
    risks = []
    for arrays, k in ((one, 1), (copies, 3)):
        model = build_model(cfg.replace(slices_per_lesion=k))
        bag_inputs = site_inputs(model, cfg.replace(slices_per_lesion=k), arrays, tmp_path, CPU)
        assert bag_inputs.train.n_slices == k
        fit_survival(model, bag_inputs.train, time, event, cfg, seed=3)
        risks.append(model_outputs(model, bag_inputs.test, CPU)[0][:, 0])
    np.testing.assert_allclose(risks[1], risks[0], rtol=1e-5, atol=1e-6)
    assert np.abs(risks[0] - risk).max() > 1e-3  # and the bag of different sections is another model
