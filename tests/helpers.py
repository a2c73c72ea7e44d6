"""Test helpers: write tiny DICOM files and synthetic images with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedrad.client.dataset import SiteData

_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    modality: str = "CT",
    pixel_spacing: tuple[float, float] | None = (0.7, 0.7),
    imager_spacing: tuple[float, float] | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    photometric: str = "MONOCHROME2",
    preamble: bool = True,
) -> Path:
    """Write ``stored`` (int16/uint16, (rows, cols) or (frames, rows, cols)) as DICOM.

    Args:
        path: Where to write (parent folders are created).
        stored: Stored pixel values; int16 gives Pixel Representation 1.
        modality: (0008,0060) Modality.
        pixel_spacing: (0028,0030) Pixel Spacing (row, col) mm, None to omit.
        imager_spacing: (0018,1164) Imager Pixel Spacing, None to omit.
        slope, intercept: (0028,1053)/(0028,1052); omitted when None.
        photometric: (0028,0004) Photometric Interpretation.
        preamble: False writes a bare dataset without the 128-byte preamble,
            'DICM' prefix and file meta.

    Returns:
        ``path``.
    """
    stored = np.asarray(stored)
    if stored.dtype not in (np.int16, np.uint16):
        raise TypeError(f"stored must be int16 or uint16, got {stored.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.SOPClassUID = _SOP_CLASS.get(modality, _SECONDARY_CAPTURE)
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_spacing]
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return path


def disk(
    shape: tuple[int, int],
    spacing_mm: tuple[float, float],
    radius_mm: float,
    center_mm: tuple[float, float] | None = None,
    supersample: int = 8,
) -> np.ndarray:
    """Anti-aliased disk: each pixel holds the fraction of its area inside the disk.

    Pixel (r, c) covers [r*sr, (r+1)*sr) x [c*sc, (c+1)*sc) mm; the default
    centre is the image centre. Returns float32 in [0, 1].
    """
    rows, cols = shape
    sr, sc = spacing_mm
    cy, cx = center_mm if center_mm is not None else (rows * sr / 2.0, cols * sc / 2.0)
    sub = (np.arange(supersample) + 0.5) / supersample
    y = ((np.arange(rows)[:, None] + sub[None, :]) * sr).reshape(-1)
    x = ((np.arange(cols)[:, None] + sub[None, :]) * sc).reshape(-1)
    inside = ((y[:, None] - cy) ** 2 + (x[None, :] - cx) ** 2) <= radius_mm**2
    return inside.reshape(rows, supersample, cols, supersample).mean(axis=(1, 3)).astype(np.float32)


def tiny_site(root: Path, *, name: str = "tiny", n_patients: int = 16, seed: int = 1, image_size: int = 96,
              **spec: object) -> Path:
    """One small synthetic site folder under `root` (real DICOM + labels.csv); `spec` overrides SiteSpec fields."""
    from fedrad.lab.synth import SiteSpec, generate

    fields = {"prevalence": 0.5, "spacing_mm": 0.8, "noise_hu": 10, "kernel": "smooth", "hu_offset": 0,
              "manufacturer": "Siemens", **spec}
    (folder,) = generate(root, sites=[SiteSpec(name=name, n_patients=n_patients, **fields)], seed=seed,
                         image_size=image_size)
    small_site_policy(root)
    return folder


TEST_POLICY = "min-count = 2\n"  # the tests' tiny sites hold ~16 images, below the default min-count of 11


def small_site_policy(root: Path, text: str = TEST_POLICY) -> None:
    """Write a site policy that lets tiny test sites send their aggregates into every site folder under `root`.

    A site reads `site-policy.toml` from its own data folder (simulation and deployment
    alike); without it the default min-count (11) would withhold most of a tiny site's
    aggregates. Tests of the small-count rule remove or rewrite the file.
    """
    for labels in Path(root).glob("*/labels.csv"):
        (labels.parent / "site-policy.toml").write_text(text)


def array_site(n: int = 12, size: int = 32, seed: int = 0) -> SiteData:
    """A site already as arrays (random images, alternating labels): for training code, no DICOM."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.int64)
    keys = tuple(f"img{seed}-{i}" for i in range(n))
    return SiteData(name="s", x_train=x, y_train=y, x_test=x[:4], y_test=y[:4],
                    x_unlabelled=np.zeros((0, 3, size, size), np.float32), spacings_mm=np.zeros((0, 2)),
                    keys_train=keys, keys_test=keys[:4])


def site_reply(content, site: str, kind: str):  # noqa: ANN201 - a flwr Message
    """A reply with `content` as it reaches the coordinator from the node of site `site`.

    Each site name gets its own stable node id: the coordinator binds a name to the node
    that first used it (`fedrad.server.identity`), as a deployment binds it to a key.
    """
    import zlib

    from flwr.app import Message, RecordDict

    node = zlib.crc32(site.encode()) % 10**9 + 1
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=kind))
