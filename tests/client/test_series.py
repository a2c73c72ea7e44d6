"""Series + masks in labels.csv: slice order, series checks, masks matched to their series, slice modes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedrad.client.dataset import load_site
from fedrad.client.masks import read_mask
from fedrad.client.series import read_series
from fedrad.client.slices import lesion_planes
from fedrad.common.dicom import DicomReadError
from fedrad.common.preprocess import Preprocessor
from fedrad.lab.series_export import volume_affine, write_nifti, write_rtstruct, write_seg, write_series

SPACING = (2.5, 0.8, 0.8)
ORIGIN = (-20.0, -16.0, 10.0)


def _phantom(seed: int = 0, shape: tuple[int, int, int] = (12, 40, 48)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k, r, c = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    mask = ((k - 6) / 3.2) ** 2 + ((r - 20) / 6.0) ** 2 + ((c - 22) / 8.0) ** 2 < 1
    hu = np.round(rng.normal(-50, 15, shape) + 90 * mask + 2 * k).astype(np.float32)
    return hu, mask


def _series(folder: Path, seed: int = 0, **kw) -> tuple[np.ndarray, np.ndarray, list]:
    hu, mask = _phantom(seed)
    written = write_series(folder, hu, SPACING, origin_mm=ORIGIN, **kw)
    return hu, mask, written


def test_slices_are_ordered_by_position_not_file_name(tmp_path: Path) -> None:
    hu, _, _ = _series(tmp_path / "a")
    names = [f"IMG{n:05d}" for n in np.random.default_rng(3).permutation(len(hu))]
    _series(tmp_path / "b", names=names)
    a, b = read_series(tmp_path / "a"), read_series(tmp_path / "b")
    np.testing.assert_array_equal(a.values, hu)
    np.testing.assert_array_equal(b.values, a.values)
    assert b.spacing_mm == SPACING
    np.testing.assert_allclose(b.affine, volume_affine(SPACING, ORIGIN))


def test_instance_numbers_are_not_trusted(tmp_path: Path) -> None:
    hu, _, written = _series(tmp_path / "s")
    for ds, path in zip(written, sorted((tmp_path / "s").iterdir())):
        on_disk = pydicom.dcmread(path)
        on_disk.InstanceNumber = len(hu) - int(on_disk.InstanceNumber) + 1  # reversed
        on_disk.save_as(path)
    np.testing.assert_array_equal(read_series(tmp_path / "s").values, hu)


def test_missing_slice_is_reported_as_a_gap(tmp_path: Path) -> None:
    _series(tmp_path / "s")
    (tmp_path / "s" / "0005.dcm").unlink()
    with pytest.raises(DicomReadError, match=r"uneven slice spacing.*5\.00 mm between .*0004\.dcm -> 0006\.dcm.*"
                                             r"about 1 slice\(s\) missing"):
        read_series(tmp_path / "s")


def test_two_series_in_one_folder_are_refused_by_name(tmp_path: Path) -> None:
    _series(tmp_path / "s")
    _series(tmp_path / "other", seed=1, names=[f"b{k:04d}.dcm" for k in range(12)])
    for path in (tmp_path / "other").iterdir():
        shutil.move(path, tmp_path / "s" / path.name)
    with pytest.raises(DicomReadError, match=r"folder mixes 2 series .*12 files.*12 files.*own folder"):
        read_series(tmp_path / "s")


def test_orientation_and_frame_size_must_agree(tmp_path: Path) -> None:
    _series(tmp_path / "s")
    path = tmp_path / "s" / "0003.dcm"
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.save_as(path)
    with pytest.raises(DicomReadError, match=r"slices differ in \(0020,0037\) Image Orientation"):
        read_series(tmp_path / "s")


def test_jpeg2000_series_reads_the_same_hu(tmp_path: Path) -> None:
    hu, _, _ = _series(tmp_path / "j", compress=True)
    assert pydicom.dcmread(tmp_path / "j" / "0000.dcm").file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_series(tmp_path / "j").values, hu)


@pytest.mark.parametrize("kind", ["seg", "rtstruct", "nifti"])
def test_every_mask_format_lands_on_the_series_grid(tmp_path: Path, kind: str) -> None:
    _, mask, written = _series(tmp_path / "s", names=[f"z{n}" for n in np.random.default_rng(1).permutation(12)])
    volume = read_series(tmp_path / "s")
    ordered = sorted(written, key=lambda ds: float(ds.ImagePositionPatient[2]))
    path = tmp_path / {"seg": "m.seg.dcm", "rtstruct": "m.rt.dcm", "nifti": "m.nii.gz"}[kind]
    if kind == "seg":
        write_seg(path, ordered, mask)
    elif kind == "rtstruct":
        write_rtstruct(path, ordered, mask, roi_name="GTV")
    else:
        write_nifti(path, mask, volume_affine(SPACING, ORIGIN))
    got = read_mask(path, volume, "GTV" if kind == "rtstruct" else None)
    np.testing.assert_array_equal(got, mask)


def test_seg_of_another_series_is_refused(tmp_path: Path) -> None:
    _, mask, written = _series(tmp_path / "s")
    volume = read_series(tmp_path / "s")
    # same scanner session (one Frame of Reference), another series
    _, _, other = _series(tmp_path / "other", seed=1, frame_of_reference_uid=volume.frame_of_reference_uid)
    write_seg(tmp_path / "m.dcm", other, mask)
    with pytest.raises(DicomReadError, match=r"SEG references series .* not this series"):
        read_mask(tmp_path / "m.dcm", volume)
    _, _, elsewhere = _series(tmp_path / "elsewhere", seed=2)  # another acquisition altogether
    write_seg(tmp_path / "e.dcm", elsewhere, mask)
    with pytest.raises(DicomReadError, match=r"Frame of Reference UID .* is not the series'"):
        read_mask(tmp_path / "e.dcm", volume)


def test_seg_with_foreign_sop_uids_is_refused(tmp_path: Path) -> None:
    _, mask, written = _series(tmp_path / "s")
    seg_path = tmp_path / "m.dcm"
    write_seg(seg_path, written, mask)
    path = tmp_path / "s" / "0004.dcm"  # the series is re-exported: one slice has a new SOP Instance UID
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path)
    with pytest.raises(DicomReadError, match=r"references 1 SOP Instance UID\(s\) that are not slices"):
        read_mask(seg_path, read_series(tmp_path / "s"))


def test_rtstruct_roi_must_be_named_and_exist(tmp_path: Path) -> None:
    _, mask, written = _series(tmp_path / "s")
    write_rtstruct(tmp_path / "rt.dcm", written, mask, roi_name="GTV")
    volume = read_series(tmp_path / "s")
    with pytest.raises(DicomReadError, match=r"no ROI named 'lesion' \(it has \['GTV'\]\)"):
        read_mask(tmp_path / "rt.dcm", volume, "lesion")


def test_nifti_on_another_grid_is_refused(tmp_path: Path) -> None:
    _, mask, _ = _series(tmp_path / "s")
    write_nifti(tmp_path / "m.nii.gz", mask, volume_affine((2.0, 0.8, 0.8), ORIGIN))
    with pytest.raises(DicomReadError, match="NIfTI affine does not put its voxels on the series"):
        read_mask(tmp_path / "m.nii.gz", read_series(tmp_path / "s"))


def test_slice_modes_cut_planes_through_the_lesion(tmp_path: Path) -> None:
    hu, mask = _phantom()
    _series(tmp_path / "s")
    volume = read_series(tmp_path / "s")
    largest = lesion_planes(volume, mask, mode="largest")
    assert len(largest.images) == 1
    np.testing.assert_array_equal(largest.images[0].values, hu[6])  # the ellipsoid is widest at k = 6
    slab = lesion_planes(volume, mask, mode="2.5d", slab_mm=2.5)
    np.testing.assert_array_equal(slab.images[0].values, hu[5])  # one slice spacing below the centre
    np.testing.assert_array_equal(slab.images[2].values, hu[7])
    ortho = lesion_planes(volume, mask, mode="orthogonal")
    assert ortho.images[1].values.shape == (12, 48) and ortho.images[1].spacing_mm == (2.5, 0.8)
    assert ortho.images[2].values.shape == (12, 40)
    np.testing.assert_array_equal(ortho.images[2].values, hu[:, :, 22])


@pytest.mark.parametrize("mode", ["largest", "2.5d", "orthogonal"])
def test_series_rows_load_beside_image_rows(tmp_path: Path, mode: str) -> None:
    site = tmp_path / "site"
    _, mask, written = _series(site / "ct" / "p1")
    write_seg(site / "p1.seg.dcm", written, mask)
    _, mask2, written2 = _series(site / "ct" / "p2", seed=2)
    write_rtstruct(site / "p2.rt.dcm", written2, mask2, roi_name="GTV")
    _series(site / "ct" / "p4", seed=4)
    shutil.copy(sorted((site / "ct" / "p1").iterdir())[6], site / "flat.dcm")
    (site / "labels.csv").write_text(
        "image,series,mask,roi_name,label,split\n"
        ",ct/p1,p1.seg.dcm,,1,train\n"
        ",ct/p2,p2.rt.dcm,GTV,0,train\n"
        "flat.dcm,,,,0,test\n"
        ",ct/p4,p1.seg.dcm,,1,test\n"  # the mask of another patient: refused, the rest loads
        ",ct/p3,,,1,test\n")
    pre = Preprocessor(spacing_mm=1.0, fov_mm=24.0, slice_mode=mode, slab_mm=2.5)
    data = load_site(site, pre)
    assert data.x_train.shape == (2, 3, 24, 24) and data.x_test.shape == (1, 3, 24, 24)
    assert np.isfinite(data.x_train).all()
    reasons = {s.file: s.reason for s in data.skipped}
    assert reasons["ct/p4"].startswith("labels.csv line 5: mask p1.seg.dcm: SEG's (0020,0052) Frame of Reference")
    assert "series row without a 'mask'" in reasons["ct/p3"]
    again = load_site(site, pre)
    assert again.keys_train == data.keys_train
    other = "2.5d" if mode != "2.5d" else "largest"
    assert load_site(site, Preprocessor(spacing_mm=1.0, fov_mm=24.0, slice_mode=other)).keys_train != data.keys_train


def test_multi_frame_file_reads_like_its_slice_folder(tmp_path: Path) -> None:
    hu, mask, written = _series(tmp_path / "s")
    ds = written[0].copy()
    ds.NumberOfFrames = len(hu)
    ds.SpacingBetweenSlices = SPACING[0]
    ds.PixelData = b"".join(np.clip(np.round(p + 1024), 0, 4095).astype(np.uint16).tobytes() for p in hu)
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    folder, single = read_series(tmp_path / "s"), read_series(tmp_path / "mf.dcm")
    np.testing.assert_array_equal(single.values, folder.values)
    np.testing.assert_allclose(single.affine, folder.affine)
    write_nifti(tmp_path / "m.nii.gz", mask, single.affine)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.nii.gz", single), mask)
