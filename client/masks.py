"""Read a lesion mask (DICOM SEG, RT Structure Set, or NIfTI) onto a series' voxel grid.

Every mask is matched to the series it claims to describe, and refused (a
:class:`~fedrad.common.dicom.DicomReadError` naming the mask file and the reason) unless it fits:

* **DICOM SEG** (read by highdicom): the SEG's referenced series must be the series'
  (0020,000E) Series Instance UID, every referenced SOP Instance UID one of its slices, and the
  (0020,0052) Frame of Reference UID the same. The segment is chosen by label (the row's
  ``roi_name``) or, when empty, all segments are combined.
* **RTSTRUCT** (parsed with pydicom; contours rasterised with matplotlib's ``Path``): the ROI
  named by ``roi_name`` (required when the structure set has several), its Frame of
  Reference the series'; each closed planar contour must lie on one of the series' slices
  (within a quarter of the slice spacing). rt-utils was not used: it pulls in OpenCV and has
  not been released since 2023.
* **NIfTI** (nibabel): its affine (RAS) must map its voxels onto the series' voxel centres
  (within a tenth of a voxel), allowing axis flips and permutations; the shape must agree.

The result is a bool (slices, rows, cols) array in the series' slice order, never empty.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from matplotlib.path import Path as Polygon

from fedrad.client.series import Volume
from fedrad.common.dicom import DicomReadError

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def read_mask(path: Path, volume: Volume, roi_name: str | None = None) -> np.ndarray:
    """The lesion mask at `path` on `volume`'s grid, bool (slices, rows, cols).

    Raises:
        DicomReadError: unreadable mask, a mask that does not fit the series, or an empty one.
    """
    path = Path(path)
    if not path.is_file():
        raise DicomReadError(path, "mask file not found (mask paths are relative to the site folder)")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        mask = _nifti(path, volume)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except Exception as exc:
            raise DicomReadError(path, f"mask is neither NIfTI (.nii/.nii.gz) nor readable DICOM ({exc})") from exc
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class == _SEG_SOP_CLASS:
            mask = _seg(path, ds, volume, roi_name)
        elif sop_class == _RTSTRUCT_SOP_CLASS:
            mask = _rtstruct(path, ds, volume, roi_name)
        else:
            raise DicomReadError(
                path, f"mask must be a DICOM SEG, an RT Structure Set or NIfTI; (0008,0016) SOP Class UID is "
                f"{sop_class or 'absent'} (modality {ds.get('Modality', '?')})")
    if not mask.any():
        raise DicomReadError(path, "mask is empty on this series (no lesion voxel)")
    return mask


def _seg(path: Path, ds: pydicom.Dataset, volume: Volume, roi_name: str | None) -> np.ndarray:
    import highdicom as hd  # imported here: ~0.5 s, needed only by sites with SEG masks

    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:
        raise DicomReadError(path, f"not a valid DICOM SEG ({type(exc).__name__}: {exc})") from exc
    for_uid = str(seg.get("FrameOfReferenceUID", ""))
    if volume.frame_of_reference_uid and for_uid and for_uid != volume.frame_of_reference_uid:
        raise DicomReadError(
            path, f"SEG's (0020,0052) Frame of Reference UID {for_uid} is not the series' "
            f"{volume.frame_of_reference_uid}: the mask was drawn on another acquisition")
    referenced = seg.get_source_image_uids()
    series = {str(s) for _, s, _ in referenced}
    if volume.series_uid not in series:
        raise DicomReadError(
            path, f"SEG references series {', '.join(sorted(series)) or '(none)'}, not this series "
            f"({volume.series_uid}); check that the row's mask belongs to its series")
    ours = {uid for uid, _ in volume.sop_uids}
    foreign = sorted({str(sop) for _, _, sop in referenced} - ours)
    if foreign:
        raise DicomReadError(
            path, f"SEG references {len(foreign)} SOP Instance UID(s) that are not slices of the series "
            f"(first: {foreign[0]}); the series is incomplete or the mask belongs to another export")
    numbers = None
    if roi_name:
        numbers = seg.get_segment_numbers(segment_label=roi_name)
        if not numbers:
            labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
            raise DicomReadError(path, f"SEG has no segment labelled {roi_name!r} (it has {labels})")
    multi_frame = len({uid for uid, _ in volume.sop_uids}) == 1 and len(volume.sop_uids) > 1
    try:
        if multi_frame:
            pixels = seg.get_pixels_by_source_frame(
                volume.sop_uids[0][0], source_frame_numbers=[f for _, f in volume.sop_uids],
                segment_numbers=numbers, combine_segments=True, assert_missing_frames_are_empty=True)
        else:
            pixels = seg.get_pixels_by_source_instance(
                [uid for uid, _ in volume.sop_uids], segment_numbers=numbers, combine_segments=True,
                assert_missing_frames_are_empty=True)
    except Exception as exc:
        raise DicomReadError(path, f"cannot place the SEG's frames on the series ({type(exc).__name__}: {exc})") from exc
    if pixels.shape != volume.values.shape:
        raise DicomReadError(path, f"SEG frames are {pixels.shape[1:]}, the series' slices {volume.values.shape[1:]}")
    return pixels > 0


def _rtstruct(path: Path, ds: pydicom.Dataset, volume: Volume, roi_name: str | None) -> np.ndarray:
    rois = {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])}
    fors = {int(r.ROINumber): str(r.get("ReferencedFrameOfReferenceUID", ""))
            for r in ds.get("StructureSetROISequence", [])}
    if not rois:
        raise DicomReadError(path, "RTSTRUCT has no (3006,0020) Structure Set ROI Sequence")
    if roi_name:
        chosen = [n for n, name in rois.items() if name == roi_name]
        if not chosen:
            raise DicomReadError(path, f"RTSTRUCT has no ROI named {roi_name!r} (it has {sorted(rois.values())}); "
                                 "give the lesion's ROI name in labels.csv's roi_name column")
    elif len(rois) == 1:
        chosen = list(rois)
    else:
        raise DicomReadError(path, f"RTSTRUCT has {len(rois)} ROIs ({sorted(rois.values())}); name the lesion's "
                             "ROI in labels.csv's roi_name column")
    number = chosen[0]
    if volume.frame_of_reference_uid and fors[number] and fors[number] != volume.frame_of_reference_uid:
        raise DicomReadError(
            path, f"ROI {rois[number]!r} is on Frame of Reference {fors[number]}, the series on "
            f"{volume.frame_of_reference_uid}: the contours were drawn on another acquisition")
    contours = [c for r in ds.get("ROIContourSequence", []) if int(r.ReferencedROINumber) == number
                for c in r.get("ContourSequence", [])]
    if not contours:
        raise DicomReadError(path, f"ROI {rois[number]!r} has no contours")
    ours = {uid for uid, _ in volume.sop_uids}
    to_index = np.linalg.inv(volume.affine)
    mask = np.zeros(volume.values.shape, dtype=bool)
    n_slices, rows, cols = mask.shape
    rr, cc = np.mgrid[0:rows, 0:cols]
    centres = np.column_stack([rr.ravel(), cc.ravel()])
    for contour in contours:
        for item in contour.get("ContourImageSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            if uid and uid not in ours:
                raise DicomReadError(path, f"ROI {rois[number]!r} contour references SOP Instance UID {uid}, "
                                     "which is not a slice of the series")
        points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
        index = (to_index @ np.column_stack([points, np.ones(len(points))]).T).T[:, :3]
        k = float(np.mean(index[:, 0]))
        if np.ptp(index[:, 0]) > 0.25 or abs(k - round(k)) > 0.25 or not 0 <= round(k) < n_slices:
            raise DicomReadError(path, f"ROI {rois[number]!r} has a contour that does not lie on a slice of the "
                                 f"series (slice index {k:.2f} of 0..{n_slices - 1})")
        if len(points) < 3:
            continue  # a point or a line encloses nothing
        inside = Polygon(index[:, 1:]).contains_points(centres).reshape(rows, cols)
        mask[round(k)] ^= inside  # XOR: a contour inside another is a hole (DICOM's convention)
    return mask


def _nifti(path: Path, volume: Volume) -> np.ndarray:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise DicomReadError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DicomReadError(path, f"NIfTI mask must be 3-D, got shape {data.shape}")
    # series index (k, r, c) -> NIfTI voxel (i, j, k): must be a signed permutation (with offsets).
    to_nifti = np.linalg.inv(_RAS_TO_LPS @ image.affine) @ volume.affine
    linear = to_nifti[:3, :3]
    perm = np.abs(linear).argmax(axis=0)
    signs = np.sign(linear[perm, np.arange(3)])
    expected = np.zeros((3, 3))
    expected[perm, np.arange(3)] = signs
    offset = to_nifti[:3, 3]
    corners = np.array([[a, b, c] for a in (0, volume.values.shape[0] - 1) for b in (0, volume.values.shape[1] - 1)
                        for c in (0, volume.values.shape[2] - 1)], dtype=np.float64)
    landed = corners @ linear.T + offset
    want = corners @ expected.T + np.round(offset)
    if len(set(perm.tolist())) != 3 or np.abs(landed - want).max() > 0.1:
        raise DicomReadError(
            path, "NIfTI affine does not put its voxels on the series' voxel centres (voxel size, orientation or "
            f"origin differ by up to {np.abs(landed - want).max():.2f} voxels); export the mask on the series' grid")
    out = np.transpose(data, perm)  # volume axis a is NIfTI axis perm[a]
    if out.shape != volume.values.shape:
        raise DicomReadError(path, f"NIfTI mask shape {data.shape} does not match the series' {volume.values.shape} "
                             "(slices, rows, cols) voxels")
    for axis in range(3):
        start = 0 if signs[axis] > 0 else out.shape[axis] - 1
        if round(offset[perm[axis]]) != start:
            raise DicomReadError(path, "NIfTI mask is offset from the series by "
                                 f"{round(offset[perm[axis]]) - start} voxels along one axis; export it on the series' grid")
    flips = tuple(axis for axis in range(3) if signs[axis] < 0)
    return np.flip(out, axis=flips) > 0 if flips else out > 0
