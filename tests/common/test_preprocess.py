"""Tests for fedrad.common.preprocess: spacing-correct resampling and channel mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrad.common.dicom import DicomImage, read_image
from fedrad.common.preprocess import (
    CT_WINDOWS,
    NormalizeForBackbone,
    Preprocessor,
    ResampleCrop,
    RobustScaleChannels,
    Stack,
    WindowChannels,
)
from tests.helpers import disk, write_dicom


def _image(values: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0), modality: str = "CT") -> DicomImage:
    return DicomImage(np.asarray(values, dtype=np.float32), spacing, modality, Path("mem.dcm"))


# ---------------------------------------------------------------- ResampleCrop


def test_size_and_parameter_validation() -> None:
    assert ResampleCrop().size == 96
    assert ResampleCrop(spacing_mm=0.7, fov_mm=50.0).size == round(50 / 0.7)
    for bad in ({"spacing_mm": 0}, {"spacing_mm": float("nan")}, {"fov_mm": -1}, {"order": 2},
                {"spacing_mm": 2.0, "fov_mm": 0.5}):
        with pytest.raises(ValueError):
            ResampleCrop(**bad)


@pytest.mark.parametrize("spacing", [(0.6, 0.6), (1.0, 1.0), (0.5, 1.0), (1.0, 0.6)])
def test_disk_area_is_spacing_independent(spacing: tuple[float, float]) -> None:
    """A 10 mm radius disk covers pi*10^2 mm^2 = 1257 output px at 0.5 mm, whatever the input grid."""
    shape = (round(60 / spacing[0]), round(60 / spacing[1]))
    out = ResampleCrop(spacing_mm=0.5, fov_mm=48.0)(_image(disk(shape, spacing, 10.0), spacing))
    mask = out > 0.5
    expected = np.pi * 10.0**2 / 0.5**2
    assert abs(mask.sum() - expected) / expected < 0.05
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    assert abs(len(rows) - 40) <= 1 and abs(len(cols) - 40) <= 1  # round, 20 mm wide, 40 px
    assert abs(rows.mean() - 47.5) < 0.6 and abs(cols.mean() - 47.5) < 0.6  # centred


def test_identity_grid_maps_pixels_exactly() -> None:
    """Input at the output spacing: output pixel i is input pixel i + offset, no blur, no shift."""
    values = np.zeros((100, 100), np.float32)
    values[60, 30] = 1.0
    out = ResampleCrop(spacing_mm=0.5, fov_mm=48.0)(_image(values, (0.5, 0.5)))
    # image centre 25 mm; output i centre at 25 + (i + 0.5 - 48) * 0.5 = (i + 2 + 0.5) * 0.5 mm
    expected = np.zeros((96, 96), np.float32)
    expected[58, 28] = 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.8, 0.6)])
def test_pixel_centre_convention(spacing: tuple[float, float]) -> None:
    """Pixel (r, c) centre is at ((r + .5)*sr, (c + .5)*sc) mm; centring on it puts it between
    the 4 central output pixels (even size), each 0.25 mm away along each axis."""
    values = np.zeros((50, 50), np.float32)
    values[20, 33] = 1.0
    out = ResampleCrop(spacing_mm=0.5, fov_mm=48.0)(_image(values, spacing), center_rc=(20, 33))
    weight = (1 - 0.25 / spacing[0]) * (1 - 0.25 / spacing[1])  # bilinear tent
    np.testing.assert_allclose(out[47:49, 47:49], weight, rtol=1e-5)
    assert out.max() == pytest.approx(weight, rel=1e-5)


def test_bright_pixel_lands_at_expected_output_position() -> None:
    values = np.zeros((60, 60), np.float32)
    values[40, 20] = 1.0
    # centre (40.5, 20.5) mm, image centre (30, 30) mm -> offset (10.5, -9.5) mm
    # -> output index offset/0.5 - 0.5 + 48 = (68.5, 28.5): between px 68/69 and 28/29
    out = ResampleCrop(spacing_mm=0.5, fov_mm=48.0)(_image(values, (1.0, 1.0)))
    np.testing.assert_allclose(out[68:70, 28:30], 0.5625, rtol=1e-5)
    assert np.count_nonzero(out) == 4 * 4  # tent of half-width 1 mm covers 4 output px per axis


def test_out_of_image_samples_get_the_image_minimum() -> None:
    """A 10 x 10 mm image covers exactly 20 x 20 output px; everything else is the minimum."""
    values = np.full((10, 10), 50.0, np.float32)
    values[5, 5] = -1000.0
    out = ResampleCrop(spacing_mm=0.5, fov_mm=48.0)(_image(values, (1.0, 1.0)))
    assert np.count_nonzero(out == -1000.0) == 96 * 96 - 400
    np.testing.assert_array_equal(out[38:58, 38:58] > -1000.0, True)
    assert out[37, 50] == -1000.0 and out[58, 50] == -1000.0


def test_crop_entirely_outside_is_all_fill() -> None:
    values = np.arange(16, dtype=np.float32).reshape(4, 4) + 3
    out = ResampleCrop()(_image(values), center_rc=(500.0, -500.0))
    np.testing.assert_array_equal(out, 3.0)


def test_fine_input_is_antialiased() -> None:
    """A 0.1 mm checkerboard (finer than the 0.5 mm output) must average out, not alias."""
    rr, cc = np.indices((600, 600))
    checker = ((rr + cc) % 2).astype(np.float32) * 1000.0
    out = ResampleCrop(spacing_mm=0.5, fov_mm=48.0)(_image(checker, (0.1, 0.1)))
    assert abs(out.mean() - 500.0) < 5.0 and out.std() < 10.0


def test_large_image_crop_matches_whole_image_blur() -> None:
    """Blurring only the sub-image that feeds the crop equals blurring everything."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    values = rng.normal(size=(800, 700)).astype(np.float32)
    image = _image(values, (0.2, 0.25))
    crop = ResampleCrop(spacing_mm=0.5, fov_mm=30.0)
    out = crop(image, center_rc=(300.0, 420.0))
    blurred = ndimage.gaussian_filter(values.astype(np.float64), sigma=(0.75, 0.5), mode="nearest")
    axes = [((c + 0.5) * s + (np.arange(60) + 0.5 - 30) * 0.5) / s - 0.5
            for c, s in zip((300.0, 420.0), (0.2, 0.25))]
    ref = ndimage.map_coordinates(blurred, np.meshgrid(*axes, indexing="ij"), order=1)
    np.testing.assert_allclose(out, ref, atol=1e-4)


# ---------------------------------------------------------------- channel maps


def test_window_channels_values() -> None:
    hu = np.array([[-1350.0, -600.0, 150.0], [40.0, 240.0, 3000.0]], np.float32)
    out = WindowChannels(CT_WINDOWS)(hu)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0.0, 0.5, 1.0])  # lung window: -1350..150 HU
    np.testing.assert_allclose(out[1, 1], [0.5, 1.0, 1.0])  # soft tissue: -160..240 HU
    assert out.min() >= 0.0 and out.max() <= 1.0
    for bad in ([], [(0.0, 0.0)], [(0.0, -5.0)], [(float("nan"), 100.0)], [(1.0,)]):
        with pytest.raises(ValueError):
            WindowChannels(bad)


def test_robust_scale() -> None:
    x = np.linspace(0, 1000, 101 * 99, dtype=np.float32).reshape(101, 99)
    out = RobustScaleChannels()(x)
    assert out.shape == (3, 101, 99) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], out[2])
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.isclose(out[0].mean(), 0.5, atol=0.01)
    np.testing.assert_array_equal(RobustScaleChannels()(np.full((5, 5), 7.0)), 0.0)
    ref = RobustScaleChannels()(np.full((2, 2), 500.0), reference=x)
    np.testing.assert_allclose(ref, 0.5, atol=0.01)  # percentiles from the reference
    with pytest.raises(ValueError):
        RobustScaleChannels(low_pct=99, high_pct=1)


def test_normalize_for_backbone() -> None:
    out = NormalizeForBackbone()(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(out, [-127 / 128, 0.5 / 128, 1.0])
    assert out.dtype == np.float32


# ---------------------------------------------------------------- Preprocessor


def test_preprocessor_ct_path_is_window_composition() -> None:
    values = disk((80, 80), (0.7, 0.7), 8.0) * 1000.0 - 1000.0
    image = _image(values, (0.7, 0.7))
    pre = Preprocessor()
    expected = NormalizeForBackbone()(WindowChannels()(ResampleCrop()(image)))
    np.testing.assert_array_equal(pre(image), expected)


def test_preprocessor_mr_file_uses_robust_scaling(tmp_path: Path) -> None:
    stored = (disk((64, 64), (0.8, 0.8), 10.0) * 900 + 100).astype(np.uint16)
    image = read_image(write_dicom(tmp_path / "mr.dcm", stored, modality="MR", pixel_spacing=(0.8, 0.8)))
    crop = ResampleCrop()(image)
    expected = NormalizeForBackbone()(RobustScaleChannels()(crop, reference=image.values))
    out = Preprocessor()(image)
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, Preprocessor()(_image(image.values, (0.8, 0.8), "CT")))


def test_preprocessor_rejects_wrong_window_count() -> None:
    with pytest.raises(ValueError, match="exactly 3"):
        Preprocessor(ct_windows=CT_WINDOWS[:2])


TRANSFORMS = [
    ("resample", lambda img: ResampleCrop(spacing_mm=0.5, fov_mm=20.0)(img, (10.3, 12.7))),
    ("window", lambda img: WindowChannels()(img.values)),
    ("robust", lambda img: RobustScaleChannels()(img.values)),
    ("normalize", lambda img: NormalizeForBackbone()(img.values)),
    ("pre_ct", lambda img: Preprocessor(fov_mm=20.0)(img)),
    ("pre_mr", lambda img: Preprocessor(fov_mm=20.0)(_image(img.values, img.spacing_mm, "MR"))),
]
SHAPES = {"resample": (40, 40), "window": (3, 30, 25), "robust": (3, 30, 25), "normalize": (30, 25),
          "pre_ct": (3, 40, 40), "pre_mr": (3, 40, 40)}


@pytest.mark.parametrize("name,transform", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
@pytest.mark.parametrize("kind", ["random", "constant"])
def test_transform_contract(name: str, transform, kind: str) -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 300, (30, 25)) if kind == "random" else np.full((30, 25), -50.0)
    image = _image(values.astype(np.float32), (0.7, 0.9))
    before = image.values.copy()
    out1, out2 = transform(image), transform(image)
    np.testing.assert_array_equal(image.values, before)  # input not mutated
    assert out1.dtype == np.float32 and out1.shape == SHAPES[name]
    np.testing.assert_array_equal(out1, out2)  # deterministic
    assert np.isfinite(out1).all()


def test_stack_concatenates_its_parts_and_checks_their_size():
    image = _image(np.linspace(-1000, 1000, 64 * 64).reshape(64, 64), (0.7, 0.7))
    a, b = Preprocessor(spacing_mm=0.5, fov_mm=16.0), Preprocessor(spacing_mm=0.5, fov_mm=16.0, ct_windows=(
        (0.0, 100.0), (50.0, 200.0), (100.0, 300.0)))
    out = Stack(a, b)(image, (30.0, 31.0))
    np.testing.assert_array_equal(out, np.concatenate([a(image, (30.0, 31.0)), b(image, (30.0, 31.0))]))
    assert repr(Stack(a, b)) == f"Stack({a!r}, {b!r})" and Stack(a, b).size == a.size
    with pytest.raises(ValueError, match="one output size"):
        Stack(a, Preprocessor(spacing_mm=1.0, fov_mm=16.0))
