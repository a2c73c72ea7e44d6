"""Tests for fedrad.common.dicom.read_image: units, photometric, spacing, and failures."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from fedrad.common.dicom import DicomImage, DicomReadError, read_image
from tests.helpers import write_dicom

STORED = np.array([[0, 100, 500], [1000, 1500, 2000]], dtype=np.int16)


def test_ct_rescale_gives_hu(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ct.dcm", STORED, slope=2, intercept=-1024, pixel_spacing=(0.6, 0.8))
    image = read_image(path)
    assert isinstance(image, DicomImage)
    assert image.values.dtype == np.float32
    np.testing.assert_array_equal(image.values, STORED.astype(np.float32) * 2 - 1024)
    assert image.spacing_mm == (0.6, 0.8)
    assert image.modality == "CT"
    assert image.path == path


def test_mr_without_rescale_keeps_stored_values(tmp_path: Path) -> None:
    stored = np.arange(12, dtype=np.uint16).reshape(3, 4) * 7
    image = read_image(write_dicom(tmp_path / "mr.dcm", stored, modality="MR"))
    np.testing.assert_array_equal(image.values, stored.astype(np.float32))
    assert image.modality == "MR"


def test_monochrome1_is_inverted_so_higher_is_brighter(tmp_path: Path) -> None:
    stored = np.array([[10, 20], [30, 4000]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "cr.dcm", stored, modality="CR", photometric="MONOCHROME1",
        pixel_spacing=None, imager_spacing=(0.15, 0.15),
    )
    image = read_image(path)
    np.testing.assert_array_equal(image.values, 4010.0 - stored.astype(np.float32))
    assert image.spacing_mm == (0.15, 0.15)  # from (0018,1164) Imager Pixel Spacing


def test_monochrome1_ct_keeps_hu(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ct1.dcm", STORED, photometric="MONOCHROME1", slope=1, intercept=-1024)
    np.testing.assert_array_equal(read_image(path).values, STORED - 1024.0)


def test_pixel_spacing_preferred_over_imager_spacing(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "dx.dcm", STORED, modality="DX", pixel_spacing=(0.14, 0.15),
                       imager_spacing=(0.2, 0.2))
    assert read_image(path).spacing_mm == (0.14, 0.15)


def test_multiframe_takes_middle_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((4, 5), v, dtype=np.int16) for v in (10, 20, 30)])
    image = read_image(write_dicom(tmp_path / "mf.dcm", frames, slope=1, intercept=0))
    assert image.values.shape == (4, 5)
    assert np.all(image.values == 20)


def test_enhanced_multiframe_reads_functional_groups(tmp_path: Path) -> None:
    """Enhanced CT keeps rescale and spacing in the functional groups, not at the top level."""
    frames = np.stack([np.full((4, 5), v, dtype=np.int16) for v in (10, 20, 30, 40)])
    path = write_dicom(tmp_path / "enh.dcm", frames, pixel_spacing=None)
    ds = pydicom.dcmread(path)
    measures, transform, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = ["0.45", "0.55"]
    transform.RescaleSlope, transform.RescaleIntercept = "1", "-1024"
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.save_as(path)
    image = read_image(path)
    assert image.spacing_mm == (0.45, 0.55)
    assert np.all(image.values == 30 - 1024)  # frame 4 // 2 = 2 (0-based)


def test_file_without_preamble_is_read(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "bare.dcm", STORED, slope=1, intercept=-1024, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(path).values, STORED - 1024.0)


def _refusal(path: Path) -> DicomReadError:
    with pytest.raises(DicomReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert str(info.value) == f"{path}: {info.value.reason}"
    return info.value


def test_missing_spacing_refused_naming_both_tags(tmp_path: Path) -> None:
    error = _refusal(write_dicom(tmp_path / "nospacing.dcm", STORED, pixel_spacing=None))
    assert "(0028,0030) Pixel Spacing" in error.reason
    assert "(0018,1164) Imager Pixel Spacing" in error.reason


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("spacing", [(0.0, 0.7), (-0.5, 0.5), (float("nan"), 0.7)])
def test_invalid_spacing_refused(tmp_path: Path, spacing: tuple[float, float]) -> None:
    error = _refusal(write_dicom(tmp_path / "bad.dcm", STORED, pixel_spacing=spacing))
    assert "(0028,0030) Pixel Spacing" in error.reason


def test_text_file_renamed_dcm_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("patient id,label\n123,1\n")
    assert "not a DICOM" in _refusal(path).reason


def test_truncated_file_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "full.dcm", np.zeros((64, 64), dtype=np.int16))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-1000])
    assert "truncated: 7192 of the 8192 bytes" in _refusal(cut).reason


def test_missing_file_and_directory_refused(tmp_path: Path) -> None:
    assert "not found" in _refusal(tmp_path / "absent.dcm").reason
    assert "directory" in _refusal(tmp_path).reason


def test_colour_image_refused(tmp_path: Path) -> None:
    error = _refusal(Path(pydicom.data.get_testdata_file("SC_rgb_small_odd.dcm")))
    assert "(0028,0004) Photometric Interpretation" in error.reason and "RGB" in error.reason


def test_no_pixel_data_refused() -> None:
    assert "(7FE0,0010) Pixel Data" in _refusal(Path(pydicom.data.get_testdata_file("rtplan.dcm"))).reason


def test_compressed_without_handler_names_syntax_and_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """fedrad installs the decoders; a site whose install lacks one still gets the remedy."""
    path = Path(pydicom.data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert get_decoder(syntax).is_available  # pinned in pyproject.toml
    monkeypatch.setattr("fedrad.common.dicom.get_decoder",
                        lambda uid: SimpleNamespace(is_available=False, is_encapsulated=True))
    reason = _refusal(path).reason
    assert "JPEG-LS" in reason and "pylibjpeg" in reason


def test_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(DicomReadError(Path("/x.dcm"), "why")))
    assert (error.path, error.reason, str(error)) == (Path("/x.dcm"), "why", "/x.dcm: why")


@pytest.mark.filterwarnings("ignore")
def test_pydicom_torture_suite() -> None:
    """Every pydicom test file either reads to a finite image or raises DicomReadError."""
    paths = [Path(p) for p in pydicom.data.get_testdata_files()]
    assert len(paths) > 100
    read, refused = 0, 0
    for path in paths:
        try:
            image = read_image(path)
        except DicomReadError as error:
            assert str(path) in str(error) and error.reason
            refused += 1
            continue
        assert image.values.ndim == 2 and image.values.dtype == np.float32
        assert np.isfinite(image.values).all()
        assert all(np.isfinite(s) and s > 0 for s in image.spacing_mm)
        read += 1
    assert read >= 20 and refused >= 20
