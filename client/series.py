"""Read one CT series (a folder of slices, or one multi-frame file) into a checked volume.

A radiomics study arrives as a series, not as one slice. Its files are named by whatever the
PACS export chose, so slices are ordered by (0020,0032) Image Position (Patient) projected on
the slice normal (the cross product of the two (0020,0037) Image Orientation (Patient)
direction cosines), never by file name or (0020,0013) Instance Number. A series is refused,
with a reason naming the folder and the files at fault, unless:

* it holds one (0020,000E) Series Instance UID (two series in one folder are named with
  their file counts: put each in its own folder);
* every slice has the same orientation, frame size and pixel spacing;
* slice positions lie along the normal (no gantry tilt) and are evenly spaced: a gap (a
  missing slice) or two slices at one position are reported with the positions and files.

Pixels are decoded by `fedrad.common.dicom` (HU for CT, compressed syntaxes included).

Geometry: :attr:`Volume.affine` maps voxel indices (k, r, c) = (slice, row, column) to
patient coordinates (LPS, mm) as DICOM defines them: the centre of pixel (r, c) of slice k
lies at ``IPP_0 + c*dc*X + r*dr*Y + k*dz*N`` with X, Y the row and column direction
cosines and N the slice normal.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from fedrad.common.dicom import DicomImage, DicomReadError, read_frames, read_image

_ORIENTATION_TOL = 1e-4  # direction cosines: exports round them to ~6 digits
_SPACING_RTOL = 0.05  # slice gaps within 5 % of the median count as even (float positions)
_IPP = "(0020,0032) Image Position (Patient)"
_IOP = "(0020,0037) Image Orientation (Patient)"


@dataclass(frozen=True)
class Volume:
    """One series as a 3-D array with its patient geometry.

    Attributes:
        values: float32 (slices, rows, cols); HU for CT; slices ordered along the normal.
        spacing_mm: (slice, row, col) spacing in mm.
        affine: 4x4 float64; (k, r, c, 1) -> patient LPS mm.
        modality: (0008,0060) Modality.
        series_uid: (0020,000E) Series Instance UID.
        frame_of_reference_uid: (0020,0052) Frame of Reference UID ("" when absent).
        sop_uids: Per slice (SOP Instance UID, frame number, 1-based); a folder's slices
            have frame number 1.
        path: The folder or multi-frame file it came from.
    """

    values: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: tuple[tuple[str, int], ...]
    path: Path

    def axial(self, k: int) -> DicomImage:
        """Slice k as a 2-D image (what a 2-D row of labels.csv would have read)."""
        return DicomImage(values=self.values[k], spacing_mm=self.spacing_mm[1:], modality=self.modality,
                          path=self.path)


@dataclass(frozen=True)
class _Slice:
    """One frame before ordering: its image, position, orientation and identity."""

    image: DicomImage
    position: np.ndarray  # (3,) LPS mm of the first pixel's centre
    orientation: np.ndarray  # (6,) row then column direction cosines
    uid: tuple[str, int]
    source: Path


def read_series(path: Path) -> Volume:
    """Read a series folder or a multi-frame file into a :class:`Volume`.

    Raises:
        DicomReadError: naming the folder/file and the reason (see the module docstring).
    """
    path = Path(path)
    if path.is_dir():
        slices, series_uid, for_uid = _folder_slices(path)
    elif path.is_file():
        slices, series_uid, for_uid = _multiframe_slices(path)
    else:
        raise DicomReadError(path, "series not found (give a folder of slice files or one multi-frame file)")
    return _assemble(slices, path, series_uid, for_uid)


def _folder_slices(folder: Path) -> tuple[list[_Slice], str, str]:
    """Headers of every DICOM image in the folder (non-image files such as DICOMDIR are ignored)."""
    headers: list[tuple[Path, Dataset]] = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(file, stop_before_pixels=True, force=True)
        except Exception:
            continue  # not DICOM at all (a README, a checksum list)
        if "Rows" in ds and "SOPInstanceUID" in ds:
            headers.append((file, ds))
    if not headers:
        raise DicomReadError(folder, "series folder holds no DICOM image files")
    by_series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in headers)
    if len(by_series) > 1:
        listing = ", ".join(f"{uid or '(no UID)'}: {n} files" for uid, n in by_series.most_common())
        raise DicomReadError(
            folder, f"folder mixes {len(by_series)} series by (0020,000E) Series Instance UID ({listing}); "
            "a series row must name one series: put each series in its own folder")
    slices = []
    for file, ds in headers:
        position, orientation = _geometry(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), file)
        slices.append(_Slice(read_image(file), position, orientation, (str(ds.SOPInstanceUID), 1), file))
    first = headers[0][1]
    return slices, str(first.get("SeriesInstanceUID", "")), str(first.get("FrameOfReferenceUID", ""))


def _multiframe_slices(file: Path) -> tuple[list[_Slice], str, str]:
    """Frames of one multi-frame file with their positions (Enhanced functional groups or top-level tags)."""
    ds, images = read_frames(file)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    slices = []
    for i, image in enumerate(images):
        position = orientation = None
        groups = ([per_frame[i]] if per_frame and i < len(per_frame) else []) + ([shared[0]] if shared else [])
        for group in groups:
            if position is None and group.get("PlanePositionSequence"):
                position = group.PlanePositionSequence[0].get("ImagePositionPatient")
            if orientation is None and group.get("PlaneOrientationSequence"):
                orientation = group.PlaneOrientationSequence[0].get("ImageOrientationPatient")
        if position is None and "ImagePositionPatient" in ds:
            offsets = ds.get("GridFrameOffsetVector")
            step = float(ds.get("SpacingBetweenSlices", 0) or 0)
            if offsets is not None and len(offsets) == len(images):
                offset = float(offsets[i])
            elif step > 0:
                offset = i * step
            else:
                raise DicomReadError(
                    file, "multi-frame file has one (0020,0032) Image Position (Patient) but neither "
                    "(3004,000C) Grid Frame Offset Vector nor (0018,0088) Spacing Between Slices; cannot place "
                    "its frames: export the series as one file per slice or as Enhanced CT")
            orientation = orientation if orientation is not None else ds.get("ImageOrientationPatient")
            p0, o = _geometry(ds.ImagePositionPatient, orientation, file)
            position = p0 + offset * np.cross(o[:3], o[3:])
        orientation = orientation if orientation is not None else ds.get("ImageOrientationPatient")
        p, o = _geometry(position, orientation, file, frame=i + 1)
        slices.append(_Slice(image, p, o, (str(ds.get("SOPInstanceUID", "")), i + 1), file))
    return slices, str(ds.get("SeriesInstanceUID", "")), str(ds.get("FrameOfReferenceUID", ""))


def _geometry(position, orientation, file: Path, frame: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    where = "" if frame is None else f" (frame {frame})"
    try:
        p = np.asarray([float(v) for v in position], dtype=np.float64)
        o = np.asarray([float(v) for v in orientation], dtype=np.float64)
    except (TypeError, ValueError):
        raise DicomReadError(
            file, f"a series slice needs {_IPP} (3 numbers) and {_IOP} (6 numbers){where}; got "
            f"{position!r} and {orientation!r}: without them slices cannot be ordered") from None
    if p.shape != (3,) or o.shape != (6,) or not (np.isfinite(p).all() and np.isfinite(o).all()):
        raise DicomReadError(file, f"{_IPP} must be 3 and {_IOP} 6 finite numbers{where}, got {list(p)}, {list(o)}")
    if abs(np.linalg.norm(o[:3]) - 1) > 1e-3 or abs(np.linalg.norm(o[3:]) - 1) > 1e-3 or abs(o[:3] @ o[3:]) > 1e-3:
        raise DicomReadError(file, f"{_IOP} must be two orthogonal unit vectors{where}, got {list(o)}")
    return p, o


def _assemble(slices: list[_Slice], path: Path, series_uid: str, for_uid: str) -> Volume:
    """Check one orientation, one frame size and spacing, even positions; order along the normal."""
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=_ORIENTATION_TOL):
            raise DicomReadError(
                path, f"slices differ in {_IOP}: {s.source.name} has {list(np.round(s.orientation, 4))}, "
                f"{first.source.name} has {list(np.round(first.orientation, 4))}; a series has one orientation")
        if s.image.values.shape != first.image.values.shape:
            raise DicomReadError(
                path, f"slices differ in frame size: {s.source.name} is {s.image.values.shape}, "
                f"{first.source.name} is {first.image.values.shape} (rows, cols)")
        if not np.allclose(s.image.spacing_mm, first.image.spacing_mm, rtol=1e-4):
            raise DicomReadError(
                path, f"slices differ in (0028,0030) Pixel Spacing: {s.source.name} has {s.image.spacing_mm}, "
                f"{first.source.name} has {first.image.spacing_mm}")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    depth = np.array([s.position @ normal for s in slices])
    order = np.argsort(depth, kind="stable")
    slices = [slices[i] for i in order]
    depth = depth[order]
    dr, dc = first.image.spacing_mm
    if len(slices) == 1:
        dz = 1.0  # one slice: no through-plane spacing; 2-D modes still work
    else:
        steps = np.diff(depth)
        same = np.flatnonzero(steps < 1e-3)
        if same.size:
            i = int(same[0])
            raise DicomReadError(
                path, f"two slices at one position ({depth[i]:.2f} mm along the normal): "
                f"{slices[i].source.name} and {slices[i + 1].source.name}{_frames(slices, i)}; "
                "a duplicate or a second acquisition of the same series")
        dz = float(np.median(steps))
        uneven = np.flatnonzero(np.abs(steps - dz) > _SPACING_RTOL * dz)
        if uneven.size:
            gaps = ", ".join(
                f"{steps[i]:.2f} mm between {depth[i]:.2f} and {depth[i + 1]:.2f} mm "
                f"({slices[i].source.name}{_frames(slices, i)} -> {slices[i + 1].source.name})"
                for i in uneven[:3])
            missing = int(round(float(np.sum(steps[uneven]) / dz - uneven.size)))
            raise DicomReadError(
                path, f"uneven slice spacing where the series' spacing is {dz:.2f} mm: {gaps}"
                + (f" (about {missing} slice(s) missing)" if missing > 0 else "")
                + "; export the complete series")
        for s in slices:
            offset = s.position - slices[0].position
            in_plane = offset - (offset @ normal) * normal
            if np.linalg.norm(in_plane) > 0.01 * max(dr, dc, 1.0) + 1e-3:
                raise DicomReadError(
                    path, f"slice {s.source.name} is shifted {np.linalg.norm(in_plane):.2f} mm in plane from the "
                    "first slice (gantry tilt or a sheared series); resample it to a regular grid first")
    affine = np.eye(4)
    affine[:3, 0] = normal * dz
    affine[:3, 1] = col_dir * dr
    affine[:3, 2] = row_dir * dc
    affine[:3, 3] = slices[0].position
    values = np.stack([s.image.values for s in slices]).astype(np.float32, copy=False)
    return Volume(values=values, spacing_mm=(dz, float(dr), float(dc)), affine=affine,
                  modality=first.image.modality, series_uid=series_uid, frame_of_reference_uid=for_uid,
                  sop_uids=tuple(s.uid for s in slices), path=path)


def _frames(slices: list[_Slice], i: int) -> str:
    """' frame n' when the slices are frames of one file (names alone would not tell them apart)."""
    return f" frame {slices[i].uid[1]}" if slices[i].source == slices[min(i + 1, len(slices) - 1)].source else ""
