"""Compressed PACS exports: pydicom's bundled compressed test files load through fedrad's pinned decoders.

Only files shipped inside the installed pydicom package are used (``download=False``): nothing is
fetched at test time. Two bundled grey-scale files cannot be decoded by any decoder (pydicom's own
test suite lists them as undecodable): they must be refused with a reason naming the syntax and the
decoders that were tried.

Two install states are covered: with pylibjpeg-libjpeg (GPL-3.0; the `gpl-jpeg` and `dev` extras,
what the tests run with) and without it (a default install; simulated by taking its plugin out of
pydicom's JPEG decoders): then python-gdcm reads what it can, equal to the reference, and the rest
is refused naming the syntax and `pip install 'fedrad[gpl-jpeg]'`.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from fedrad.common.dicom import GPL_JPEG_HINT, DicomReadError, read_image
from tests.helpers import write_dicom

# Undecodable by every decoder (pydicom's own tests exclude them): corrupt scan parameters, and a
# sequence delimiter inside the JPEG 2000 codestream.
CORRUPT = {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}
# Lossless files with an uncompressed twin in the same bundle.
TWINS = {
    "MR_small_RLE.dcm": "MR_small.dcm",
    "MR_small_jp2klossless.dcm": "MR_small.dcm",
    "MR_small_jpeg_ls_lossless.dcm": "MR_small.dcm",
    "rtdose_rle.dcm": "rtdose.dcm",
    "rtdose_rle_1frame.dcm": "rtdose_1frame.dcm",
}


# What only pylibjpeg-libjpeg (GPL-3.0, extra `gpl-jpeg`) decodes among the pinned decoders, and
# what it shares with python-gdcm (default): JPEG baseline, extended, lossless.
LIBJPEG_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
EXTRA = "pip install 'fedrad[gpl-jpeg]'"


def _without_libjpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom as a default install has it: the pylibjpeg plugin gone from the JPEG decoders.

    (pylibjpeg itself stays: it serves JPEG 2000 through pylibjpeg-openjpeg.)
    """
    for syntax in LIBJPEG_SYNTAXES:
        available = get_decoder(syntax)._available
        if "pylibjpeg" in available:
            monkeypatch.delitem(available, "pylibjpeg")
        assert "pylibjpeg" not in get_decoder(syntax).available_plugins


def _syntax(path: Path) -> pydicom.uid.UID:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


def _bundled(name: str) -> Path:
    path = pydicom.data.get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped with pydicom {pydicom.__version__}"
    return Path(path)


def _grey_compressed_with_spacing() -> list[Path]:
    """Every bundled file whose pixel data is compressed, grey-scale, with a pixel spacing."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(pydicom.data.get_testdata_files("*.dcm")):
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True)
                syntax = ds.file_meta.TransferSyntaxUID
            except Exception:
                continue
            if (syntax.is_compressed and ds.get("SamplesPerPixel") == 1
                    and str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")
                    and ("PixelSpacing" in ds or "ImagerPixelSpacing" in ds)):
                found.append(Path(name))
    return found


def _reference(path: Path, plugin: str | None = None) -> np.ndarray:
    """pydicom's own decode of the middle frame with its modality LUT: what read_image must return."""
    ds = pydicom.dcmread(path)
    frames = pixel_array(path, decoding_plugin=plugin or "")
    frame = frames[frames.shape[0] // 2] if frames.ndim == 3 else frames
    return np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)


def test_every_syntax_the_issue_names_has_a_decoder() -> None:
    for syntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless,
                   JPEGLSNearLossless, JPEG2000Lossless, JPEG2000):
        assert get_decoder(syntax).is_available, syntax.name


def test_bundled_grey_compressed_files_load_equal_to_pydicom_decode() -> None:
    paths = _grey_compressed_with_spacing()
    syntaxes = set()
    loaded = 0
    for path in paths:
        if path.name in CORRUPT:
            continue
        image = read_image(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        np.testing.assert_array_equal(image.values, _reference(path), err_msg=path.name)
        # every installed plugin that can decode it gives the same pixels
        for plugin in get_decoder(ds.file_meta.TransferSyntaxUID).available_plugins:
            try:
                other = _reference(path, plugin)
            except Exception:
                continue  # e.g. Pillow has no 12-bit JPEG Extended
            np.testing.assert_array_equal(image.values, other, err_msg=f"{path.name} via {plugin}")
        loaded += 1
    assert loaded >= 9
    assert {JPEGExtended12Bit, JPEGLSLossless, JPEG2000Lossless, JPEG2000} <= syntaxes


@pytest.mark.parametrize("name", sorted(TWINS))
def test_lossless_files_equal_their_uncompressed_twin(name: str) -> None:
    np.testing.assert_array_equal(read_image(_bundled(name)).values, read_image(_bundled(TWINS[name])).values)


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm"])
def test_jpeg_ls_near_lossless_loads_once_spacing_is_given(name: str, tmp_path: Path) -> None:
    """pydicom ships these without a pixel spacing; with one added they decode as pydicom does."""
    ds = pydicom.dcmread(_bundled(name))
    ds.PixelSpacing = [0.5, 0.5]
    path = tmp_path / name
    ds.save_as(path)
    image = read_image(path)
    np.testing.assert_array_equal(image.values, _reference(path))
    assert image.spacing_mm == (0.5, 0.5)


def test_jpeg_lossless_decoder_works_on_the_bundled_sample() -> None:
    """The bundled JPEG-lossless sample is colour: the decoder reads it; fedrad refuses it as colour."""
    path = _bundled("SC_rgb_jpeg_gdcm.dcm")
    rgb = pixel_array(path)
    assert rgb.shape == (100, 100, 3) and rgb.std() > 0
    with pytest.raises(DicomReadError, match=r"Photometric Interpretation.*RGB"):
        read_image(path)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless])
def test_ct_compressed_losslessly_by_pydicom_reads_back_the_same_hu(syntax, tmp_path: Path) -> None:
    """A CT slice compressed the way a PACS exports it (pydicom's encoders) reads back to the same HU."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2000, size=(48, 40)).astype(np.uint16)
    plain = write_dicom(tmp_path / "plain.dcm", stored, slope=1, intercept=-1024)
    ds = pydicom.dcmread(plain)
    ds.compress(syntax)
    packed = tmp_path / "packed.dcm"
    ds.save_as(packed)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_image(packed).values, read_image(plain).values)


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_undecodable_files_are_refused_naming_syntax_and_decoders(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    shutil.copy(_bundled(name), path)
    with pytest.raises(DicomReadError) as info:
        read_image(path)
    reason = info.value.reason
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert str(path) in str(info.value)
    assert syntax.name in reason and "installed decoders (" in reason and "pylibjpeg" in reason
    assert "corrupt" in reason


def test_the_tests_run_with_libjpeg_and_gdcm_installed() -> None:
    """The dev extra pulls in gpl-jpeg: both install states below are then really exercised."""
    import gdcm  # noqa: F401 - python-gdcm, a default dependency
    import libjpeg  # noqa: F401 - pylibjpeg-libjpeg, the gpl-jpeg extra

    for syntax in LIBJPEG_SYNTAXES:
        assert {"gdcm", "pylibjpeg"} <= set(get_decoder(syntax).available_plugins), syntax.name


def test_without_libjpeg_jpeg_files_load_equal_through_gdcm_or_are_refused_naming_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [p for p in _grey_compressed_with_spacing() if _syntax(p) in LIBJPEG_SYNTAXES and p.name not in CORRUPT]
    references = {p.name: _reference(p, "pylibjpeg") for p in paths}  # decoded by libjpeg, before it goes
    _without_libjpeg(monkeypatch)
    loaded, refused = [], {}
    for path in paths:
        try:
            image = read_image(path)
        except DicomReadError as err:
            refused[path.name] = (str(err), _syntax(path))
            continue
        np.testing.assert_array_equal(image.values, references[path.name], err_msg=path.name)
        loaded.append(path.name)
    # 12-bit JPEG Extended: gdcm refuses 12-bit precision, Pillow has no 12-bit JPEG; only libjpeg reads it
    assert "JPGExtended.dcm" in refused
    for name, (message, syntax) in refused.items():
        assert name in message and syntax.name in message and str(syntax) in message
        assert EXTRA in message and "GPL-3.0" in message
    for name in CORRUPT:  # still refused as before, now also naming the extra for its JPEG syntax
        if _syntax(_bundled(name)) in LIBJPEG_SYNTAXES:
            with pytest.raises(DicomReadError, match=re.escape(EXTRA)):
                read_image(_bundled(name))


def test_with_libjpeg_the_file_gdcm_cannot_read_loads_equal_to_the_reference() -> None:
    path = _bundled("JPGExtended.dcm")
    assert _syntax(path) == JPEGExtended12Bit
    np.testing.assert_array_equal(read_image(path).values, _reference(path, "pylibjpeg"))
    with pytest.raises(Exception, match="12-bit"):
        pixel_array(path, decoding_plugin="gdcm")


@pytest.mark.parametrize("libjpeg", [True, False], ids=["with-libjpeg", "default-install"])
@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLosslessProcess14", "JPEGBaselineProcess1"])
def test_grey_jpeg_written_by_gdcm_loads_with_and_without_libjpeg(syntax: str, libjpeg: bool, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom ships no grey JPEG-lossless file: a CT slice compressed by gdcm stands in for a PACS export."""
    import gdcm

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 255 if "Baseline" in syntax else 2000, size=(48, 40)).astype(np.uint16)
    plain = write_dicom(tmp_path / "plain.dcm", stored, slope=1, intercept=-1024)
    if "Baseline" in syntax:  # 8-bit baseline needs 8-bit samples
        ds = pydicom.dcmread(plain)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = stored.astype(np.uint8).tobytes()
        ds.save_as(plain)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(plain))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    packed = tmp_path / "packed.dcm"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(packed))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    assert _syntax(packed) in LIBJPEG_SYNTAXES
    reference = _reference(packed, "pylibjpeg")
    if not libjpeg:
        _without_libjpeg(monkeypatch)
    values = read_image(packed).values
    if "Lossless" in syntax:
        np.testing.assert_array_equal(values, reference)
        np.testing.assert_array_equal(values, read_image(plain).values)
    elif libjpeg:
        np.testing.assert_array_equal(values, reference)
    else:  # lossy: gdcm's and Pillow's IJG decoders round some IDCT outputs 1 apart from libjpeg (measured:
        # 51 of 1920 pixels), which the JPEG standard's IDCT accuracy allows
        assert np.abs(values - reference).max() <= 1.0


def test_the_hint_names_the_extra_and_the_licence() -> None:
    assert EXTRA in GPL_JPEG_HINT and "GPL-3.0" in GPL_JPEG_HINT and "pylibjpeg-libjpeg" in GPL_JPEG_HINT
