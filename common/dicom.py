"""Read one DICOM file into modality values and pixel spacing.

A thin facade over pydicom so that the rest of fedrad never touches a
``Dataset``: every site-specific oddity (missing preamble, compressed transfer
syntax without a decoder, MONOCHROME1, multi-frame, missing spacing) is either
resolved here or turned into one :class:`DicomReadError` that names the file
and says what to do. Decoding and the modality LUT are pydicom's own
(``Dataset.pixel_array`` and ``pydicom.pixels.apply_modality_lut``).

Compressed PACS exports decode through pydicom's plugins, which fedrad installs pinned:
JPEG baseline/lossless, JPEG-LS and JPEG 2000 (python-gdcm), JPEG-LS (pyjpegls), JPEG 2000
(pylibjpeg-openjpeg, Pillow), JPEG baseline (Pillow) and RLE (pydicom); the opt-in extra
`gpl-jpeg` adds pylibjpeg-libjpeg (GPL-3.0), the only one for 12-bit JPEG Extended. The
plugins are tried in fedrad's order, gdcm last (`_PLUGIN_ORDER`). A file none of them can
decode is refused naming the syntax and the decoders that were tried, and, for a JPEG
syntax without libjpeg installed, how to add it.

Conventions:
    * ``values`` are float32 (rows, cols). For CT they are Hounsfield units
      (HU) after (0028,1053) Rescale Slope / (0028,1052) Rescale Intercept;
      for other modalities they are modality values (raw stored values when
      the file has no rescale and no (0028,3000) Modality LUT Sequence).
    * MONOCHROME1 images (higher stored value = darker, common for CR/DX) are
      inverted as ``max + min - values`` so that higher = brighter everywhere.
      CT is the exception: HU are physical quantities that the CT windows
      depend on, so a MONOCHROME1 CT keeps its HU (the photometric
      interpretation only describes how a viewer displays them).
    * Colour images (RGB, YBR_*, PALETTE COLOR, ...) are refused: fedrad's
      inputs are grey-scale CT/MR/X-ray, and a colour file is almost always a
      screenshot or secondary capture whose grey levels are not modality
      values.
    * Multi-frame files yield their middle frame (frame ``n // 2``, 0-based);
      decoded arrays with more dimensions than (frames, rows, cols) are refused.
    * Spacing is (row spacing, column spacing) in mm, i.e. the distance between
      the centres of adjacent rows, then of adjacent columns, from (0028,0030)
      Pixel Spacing (also looked up in the Enhanced multi-frame functional
      groups), else (0018,1164) Imager Pixel Spacing. Imager Pixel Spacing is
      measured at the detector, so for projection X-ray it overstates patient
      size by the geometric magnification (typically 5-15 %); it is not
      corrected here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_SPACING = "(0028,0030) Pixel Spacing"
_IMAGER_SPACING = "(0018,1164) Imager Pixel Spacing"
_HANDLER_HINT = (
    "install a decoder for it at the site (e.g. `pip install pylibjpeg "
    "pylibjpeg-libjpeg pylibjpeg-openjpeg` or python-gdcm), or export the "
    "images uncompressed"
)
# Plugins tried first, in this order; any other available one (python-gdcm) after them. gdcm
# decodes pydicom's bundled files and the generator's JPEG 2000 slices to the same pixels, but
# measured ~4x slower on the latter (300 frames: 1.76 s vs 0.46 s with pylibjpeg-openjpeg).
_PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")
# What pylibjpeg-libjpeg (GPL-3.0, opt-in extra `gpl-jpeg`) decodes; gdcm covers all but 12-bit
# JPEG Extended, which no other pinned decoder reads.
_LIBJPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
GPL_JPEG_HINT = (
    "JPEG baseline, extended (12-bit too) and lossless also decode with pylibjpeg-libjpeg, which "
    "fedrad does not install by default (GPL-3.0): `pip install 'fedrad[gpl-jpeg]'`"
)


class DicomReadError(ValueError):
    """A DICOM file that fedrad cannot turn into an image.

    The message names the file and the reason (citing the tag at fault, as in
    "(0028,0030) Pixel Spacing", where one is), so a site operator can fix the
    export without reading code.

    Attributes:
        path: The file that could not be read.
        reason: What must hold, what was found, and what to do.
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the exception picklable (Flower/Ray ship errors between processes).
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class DicomImage:
    """One 2-D image in modality units with its physical pixel size.

    Attributes:
        values: float32 (rows, cols); HU for CT, modality values otherwise,
            higher = brighter (MONOCHROME1 already inverted, except CT).
        spacing_mm: (row spacing, column spacing) in mm, both finite and > 0.
        modality: (0008,0060) Modality, upper-cased; "OT" when absent.
        path: The file the image came from.
    """

    values: np.ndarray
    spacing_mm: tuple[float, float]
    modality: str
    path: Path


def read_image(path: Path) -> DicomImage:
    """Read one DICOM file into a :class:`DicomImage`.

    Args:
        path: A DICOM file (Part 10 with the DICM preamble, or a bare dataset
            that pydicom can parse with ``force=True``).

    Returns:
        The image in modality units (HU for CT) with its spacing in mm.

    Raises:
        DicomReadError: For every failure (not DICOM, no pixel data, colour,
            undecodable compressed pixel data, truncated pixel data, missing or
            invalid spacing, non-finite values, ...). No pydicom or numpy
            exception escapes.
    """
    path = Path(path)
    ds = _read_dataset(path)
    try:
        return _to_image(ds, path)
    except DicomReadError:
        raise
    except Exception as exc:  # malformed tag values surface lazily in pydicom
        raise DicomReadError(
            path, f"malformed DICOM header ({type(exc).__name__}: {exc}); re-export the image"
        ) from exc


def read_frames(path: Path) -> tuple[Dataset, list[DicomImage]]:
    """Every frame of one DICOM file, each as a :class:`DicomImage`, with the parsed header.

    A multi-frame CT series stored as one file needs all its frames (``read_image`` keeps
    only the middle one); the header comes back so the caller can read the frames' geometry
    (`fedrad.client.series`). Same checks and errors as :func:`read_image`.
    """
    path = Path(path)
    ds = _read_dataset(path)
    try:
        return ds, _to_images(ds, path)
    except DicomReadError:
        raise
    except Exception as exc:
        raise DicomReadError(
            path, f"malformed DICOM header ({type(exc).__name__}: {exc}); re-export the image"
        ) from exc


def _read_dataset(path: Path) -> Dataset:
    """Parse the file, retrying without the DICM preamble check."""
    if path.is_dir():
        raise DicomReadError(path, "is a directory; expected one DICOM file")
    if not path.is_file():
        raise DicomReadError(path, "file not found")
    try:
        return pydicom.dcmread(path, force=False)
    except InvalidDicomError:
        pass  # no preamble/DICM prefix: may still be a bare dataset, retry below
    except Exception as exc:
        raise DicomReadError(path, f"cannot parse as DICOM ({type(exc).__name__}: {exc})") from exc
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise DicomReadError(
            path, f"not a DICOM file (no 'DICM' preamble and unparseable: {type(exc).__name__})"
        ) from exc
    if not any(tag in ds for tag in _PIXEL_TAGS) or "Rows" not in ds:
        raise DicomReadError(
            path,
            "not a DICOM image: no 'DICM' preamble, and no (7FE0,0010) Pixel Data or "
            "(0028,0010) Rows when parsed anyway; export the image as a DICOM Part 10 file",
        )
    return ds


def _to_image(ds: Dataset, path: Path) -> DicomImage:
    """Validate the image tags, decode, apply the modality LUT, pick the middle frame."""
    return _to_images(ds, path, middle_only=True)[0]


def _to_images(ds: Dataset, path: Path, *, middle_only: bool = False) -> list[DicomImage]:
    """Validate the image tags, decode, apply the modality LUT to the middle frame or to all."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DicomReadError(
            path,
            "no (7FE0,0010) Pixel Data element (SOP Class UID "
            f"{ds.get('SOPClassUID', 'absent')}): the file holds no image (a report, plan, "
            "DICOMDIR, or pixel data stripped on export); list only image files in labels.csv",
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME:
        raise DicomReadError(
            path,
            "(0028,0004) Photometric Interpretation must be MONOCHROME1 or MONOCHROME2, "
            f"got {repr(photometric) if photometric else 'none (tag absent)'}; fedrad reads grey-scale images only (colour "
            "and palette images are refused), export the series as grey-scale",
        )
    samples = ds.get("SamplesPerPixel", 1)
    if samples != 1:
        raise DicomReadError(
            path, f"(0028,0002) Samples per Pixel must be 1 for a grey-scale image, got {samples}"
        )
    modality = str(ds.get("Modality", "") or "OT").strip().upper()
    spacing = _spacing_mm(ds, path)
    frames = _decode(ds, path)
    if frames.ndim == 2:
        frames = frames[None]
    elif frames.ndim != 3:
        raise DicomReadError(
            path, f"decoded pixel data has shape {frames.shape}; expected (rows, cols) "
            "or (frames, rows, cols)"
        )
    indices = [frames.shape[0] // 2] if middle_only else range(frames.shape[0])
    images = []
    for index in indices:
        frame = frames[index]
        expected = (ds.get("Rows"), ds.get("Columns"))
        if frame.shape != expected or frame.size == 0:
            raise DicomReadError(
                path, f"decoded frame has shape {frame.shape} but (0028,0010) Rows, (0028,0011) "
                f"Columns say {expected}; the header or pixel data is corrupt"
            )
        values = np.asarray(apply_modality_lut(frame, _modality_lut_source(ds, index)), dtype=np.float32)
        if not np.isfinite(values).all():
            raise DicomReadError(path, "pixel values contain NaN or infinity after the modality LUT")
        if photometric == "MONOCHROME1" and modality != "CT":
            values = values.max() + values.min() - values
        images.append(DicomImage(values=values, spacing_mm=spacing, modality=modality, path=path))
    return images


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """Decode all frames with pydicom, translating its errors into reasons."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if tsyntax is None and None not in ds.original_encoding:
        # A bare dataset (no file meta) can only hold native pixel data; pydicom
        # found its encoding while parsing, so name the matching native syntax.
        implicit, little = ds.original_encoding
        tsyntax = (
            ImplicitVRLittleEndian if implicit
            else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = tsyntax
    if tsyntax is None:
        raise DicomReadError(
            path, "no (0002,0010) Transfer Syntax UID in the file meta; cannot tell how the "
            "pixel data is encoded, re-export the file as DICOM Part 10"
        )
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise DicomReadError(
            path, f"unsupported (0002,0010) Transfer Syntax UID {tsyntax} ({tsyntax.name}); "
            "export the images uncompressed"
        ) from exc
    gpl = ""
    if tsyntax in _LIBJPEG_SYNTAXES and "pylibjpeg" not in decoder.available_plugins:
        gpl = f"; {GPL_JPEG_HINT}"
    if not decoder.is_available:
        raise DicomReadError(
            path, f"pixel data is compressed as {tsyntax.name} ({tsyntax}) and no decoder for it "
            f"is installed; {_HANDLER_HINT}{gpl}"
        )
    if decoder.is_encapsulated:
        return _decode_compressed(ds, path, decoder, tsyntax, gpl)
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        sizes = re.search(r"less than expected \((\d+) vs (\d+) bytes\)", detail)
        if sizes:
            raise DicomReadError(
                path, f"(7FE0,0010) Pixel Data is truncated: {sizes[1]} of the {sizes[2]} bytes that "
                "Rows x Columns x Bits Allocated x frames require; the file was cut short, copy it again"
            ) from exc
        raise DicomReadError(path, f"cannot decode (7FE0,0010) Pixel Data: {detail}") from exc


def _decode_compressed(ds: Dataset, path: Path, decoder: Any, tsyntax: Any, gpl: str) -> np.ndarray:
    """Try the available plugins in `_PLUGIN_ORDER` (others last); refuse naming each one's error."""
    plugins = sorted(decoder.available_plugins,
                     key=lambda p: _PLUGIN_ORDER.index(p) if p in _PLUGIN_ORDER else len(_PLUGIN_ORDER))
    errors = []
    for plugin in plugins:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return np.asarray(ds.pixel_array)
        except Exception as exc:  # noqa: BLE001 - every plugin's failure goes into the reason
            errors.append(f"{plugin}: {' '.join(str(exc).split())[:200]}")
        finally:
            ds.pixel_array_options()  # the dataset keeps no plugin choice
    raise DicomReadError(
        path, f"cannot decode {tsyntax.name} ({tsyntax}) pixel data with the installed "
        f"decoders ({', '.join(plugins)}): {' | '.join(errors)}; the data may be corrupt (re-export or copy "
        f"it again) or need a different decoder: {_HANDLER_HINT}{gpl}"
    )


def _modality_lut_source(ds: Dataset, frame: int) -> Dataset:
    """Return the dataset that holds the rescale for ``frame``.

    Enhanced multi-frame objects (e.g. Enhanced CT) keep (0028,1052) Rescale
    Intercept / (0028,1053) Rescale Slope in the Pixel Value Transformation
    Sequence of the functional groups rather than at the top level; pydicom's
    ``apply_modality_lut`` only looks at the top level, so hand it that item.
    """
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return ds
    item = _functional_group_item(ds, frame, "PixelValueTransformationSequence")
    return item if item is not None and "RescaleSlope" in item else ds


def _functional_group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """First item of ``sequence`` for ``frame`` (per-frame groups first, then shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = []
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        seq = group.get(sequence)
        if seq:
            return seq[0]
    return None


def _spacing_mm(ds: Dataset, path: Path) -> tuple[float, float]:
    """(row, col) spacing in mm; refuse rather than assume 1 mm."""
    measures = _functional_group_item(ds, 0, "PixelMeasuresSequence")
    candidates = (
        (ds, "PixelSpacing", _PIXEL_SPACING),
        (measures, "PixelSpacing", _PIXEL_SPACING + " (functional groups)"),
        (ds, "ImagerPixelSpacing", _IMAGER_SPACING),
    )
    for source, keyword, label in candidates:
        if source is None or keyword not in source or source[keyword].VM == 0:
            continue
        raw = source[keyword].value
        try:
            pair = tuple(float(v) for v in raw)
        except (TypeError, ValueError) as exc:
            raise DicomReadError(path, f"{label} must be two numbers in mm, got {raw!r}") from exc
        if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
            raise DicomReadError(
                path, f"{label} must be two finite positive numbers in mm, got {list(pair)}; "
                "fix the export (fedrad needs physical pixel size to resample)"
            )
        return (pair[0], pair[1])
    raise DicomReadError(
        path, f"no pixel spacing: neither {_PIXEL_SPACING} nor {_IMAGER_SPACING} is present; "
        "fedrad will not assume 1 mm, add the spacing when exporting"
    )
