"""Write a CT volume and its lesion mask as a PACS and segmentation tools export them.

For the series generator (`fedrad.lab.synth_series`) and the tests: a folder of one DICOM file
per slice (optionally JPEG 2000 compressed by pydicom's encoder), a DICOM SEG (highdicom), an
RT Structure Set (pydicom; closed contours per slice traced by contourpy, matplotlib's
marching squares), or a NIfTI mask (nibabel) with the affine of the series.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(folder: Path, hu: np.ndarray, spacing_mm: tuple[float, float, float], *,
                 origin_mm: tuple[float, float, float] = (-40.0, -40.0, 0.0), patient_id: str = "P",
                 series_uid: str | None = None, frame_of_reference_uid: str | None = None,
                 names: list[str] | None = None, compress: bool = False) -> list[Dataset]:
    """Write `hu` (slices, rows, cols) as one CT file per slice; returns the written datasets.

    Axial orientation (rows along +Y, columns along +X), slices along +Z starting at `origin_mm`.
    Stored values are HU + 1024 (uint16) with Rescale Intercept -1024. `names` (file names)
    default to the slice order; tests pass shuffled ones.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dz, dr, dc = spacing_mm
    study = generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    names = names or [f"{k:04d}.dcm" for k in range(len(hu))]
    written = []
    for k, plane in enumerate(hu):
        ds = _ct_header(patient_id, study, series_uid, for_uid)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(origin_mm[0]), float(origin_mm[1]), float(origin_mm[2] + k * dz)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = float(dz)
        ds.PixelSpacing = [float(dr), float(dc)]
        ds.Rows, ds.Columns = plane.shape
        stored = np.clip(np.round(plane + 1024.0), 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        if compress:
            ds.compress(JPEG2000Lossless)
        ds.save_as(folder / names[k], enforce_file_format=True)
        written.append(ds)
    return written


def _ct_header(patient_id: str, study: str, series: str, for_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.Modality = "CT"
    ds.PatientID, ds.PatientName = patient_id, f"{patient_id}^"
    ds.PatientSex, ds.PatientBirthDate = "O", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber = 1
    ds.Manufacturer = "fedrad-synth"
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.KVP = 120
    return ds


def write_seg(path: Path, slices: list[Dataset], mask: np.ndarray, *, label: str = "lesion") -> None:
    """A binary DICOM SEG of `mask` (slices, rows, cols) on the written `slices` (highdicom)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=slices, pixel_array=mask.astype(bool), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="fedrad-synth",
        manufacturer_model_name="synth", software_versions="1", device_serial_number="1",
    )
    seg.save_as(path)


def write_rtstruct(path: Path, slices: list[Dataset], mask: np.ndarray, *, roi_name: str = "lesion") -> None:
    """An RT Structure Set with one ROI: one closed contour per connected region of each slice."""
    import contourpy  # matplotlib's marching squares

    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.SOPClassUID = RTSTRUCT_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime", "FrameOfReferenceUID"):
        setattr(ds, key, getattr(first, key))
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "fedrad"
    ds.StructureSetDate = datetime.date(2026, 1, 1).strftime("%Y%m%d")
    roi = Dataset()
    roi.ROINumber, roi.ROIName = 1, roi_name
    roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = Sequence([roi])
    contours = []
    for k, plane in enumerate(mask):
        if not plane.any():
            continue
        ref = slices[k]
        x0, y0, z = (float(v) for v in ref.ImagePositionPatient)
        dr, dc = (float(v) for v in ref.PixelSpacing)
        padded = np.pad(plane.astype(float), 1)
        for line in contourpy.contour_generator(z=padded).lines(0.5):
            rc = np.asarray(line)[:-1, ::-1] - 1.0  # contourpy gives (x, y) = (col, row); closed lines repeat point 0
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(rc)
            c.ContourData = [round(float(v), 3) for r, cc in rc for v in (x0 + cc * dc, y0 + r * dr, z)]
            image = Dataset()
            image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
            c.ContourImageSequence = Sequence([image])
            contours.append(c)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ContourSequence = Sequence(contours)
    ds.ROIContourSequence = Sequence([roi_contour])
    ds.save_as(path, enforce_file_format=True)


def write_nifti(path: Path, mask: np.ndarray, affine_lps: np.ndarray) -> None:
    """`mask` (slices, rows, cols) as NIfTI in the usual (x, y, z) = (cols, rows, slices) order, RAS affine."""
    import nibabel as nib

    data = np.transpose(mask.astype(np.uint8), (2, 1, 0))  # (c, r, k)
    to_series = np.zeros((4, 4))
    to_series[0, 2] = to_series[1, 1] = to_series[2, 0] = to_series[3, 3] = 1.0  # (i, j, k) -> (k, r, c)
    affine = _RAS_TO_LPS @ affine_lps @ to_series
    nib.save(nib.Nifti1Image(data, affine), str(path))


def volume_affine(spacing_mm: tuple[float, float, float], origin_mm: tuple[float, float, float]) -> np.ndarray:
    """The (k, r, c) -> LPS affine of a series written by :func:`write_series`."""
    dz, dr, dc = spacing_mm
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, dz)
    affine[:3, 1] = (0.0, dr, 0.0)
    affine[:3, 2] = (dc, 0.0, 0.0)
    affine[:3, 3] = origin_mm
    return affine

