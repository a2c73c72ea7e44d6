"""From a CT volume and its lesion mask to the 2-D planes the CNN sees (run config `slice-mode`).

* ``largest`` (default): the axial slice where the lesion is largest. One plane; the CT
  windows make its three channels, exactly as for a 2-D row. Suits a 2-D backbone pretrained
  on photographs best (its three channels are three contrasts of one picture), and thick-slice
  series (5 mm), where neighbouring slices add little. With `slices-per-lesion` k > 1 the k
  axial slices of largest lesion area, largest first, each a separate input centred on its own
  lesion section (a *slice bag*: radiomics reads the whole lesion, not one cut; training draws
  one per patient per epoch, evaluation averages the k outputs).
* ``2.5d``: the axial planes at the lesion centre and at ±`slab-mm` along the slice normal,
  one plane per channel (lesion extent and texture along z). Needs slices thinner than the
  slab to add information; planes between slices are interpolated linearly.
* ``orthogonal``: axial, coronal and sagittal planes through the lesion centre, one per
  channel: the lesion's 3-D shape in one input; through-plane resolution matters most here.

Planes are returned in the volume's own pixels with their (row, col) spacing; the
preprocessor (`fedrad.common.preprocess`) resamples each to the run's spacing, through plane
too (a coronal plane's rows are slices), and crops the run's field of view (`fov-mm`)
centred on the mask's bounding box. With one plane per channel a CT plane is mapped by one
window (`PLANE_WINDOW`, soft tissue) instead of one window per channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedrad.client.series import Volume
from fedrad.common.dicom import DicomImage
from fedrad.common.preprocess import SLICE_MODES


@dataclass(frozen=True)
class Planes:
    """The planes of one lesion, each with the lesion centre in its own pixels.

    Attributes:
        images: 1 (largest) or 3 planes (HU for CT), each with its (row, col) spacing in mm.
        centres_rc: Lesion bounding-box centre (row, col) in each plane's pixels.
        main: Index of the plane through the lesion centre in the axial direction (what a
            one-channel summary, e.g. the HU histogram, is taken from).
        bag: True when each plane is a whole input of its own (`largest` with k slices),
            False when the planes are the channels of one input (2.5d, orthogonal).
    """

    images: tuple[DicomImage, ...]
    centres_rc: tuple[tuple[float, float], ...]
    main: int
    bag: bool = True


def lesion_planes(volume: Volume, mask: np.ndarray, *, mode: str = "largest", slab_mm: float = 5.0,
                  slices: int = 1) -> Planes:
    """Cut the planes of `mode` through the lesion of `mask` (bool, the volume's shape).

    `slices` (mode ``largest`` only): how many axial slices, by `largest_slices`.

    Raises:
        ValueError: unknown mode, a mask of another shape, an empty mask, or slices < 1.
    """
    if mode not in SLICE_MODES:
        raise ValueError(f"slice-mode must be one of {SLICE_MODES}, got {mode!r}")
    if mask.shape != volume.values.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {volume.values.shape}")
    where = np.argwhere(mask)
    if where.size == 0:
        raise ValueError("mask is empty")
    lo, hi = where.min(axis=0), where.max(axis=0)
    kc, rc, cc = ((lo + hi) / 2.0).tolist()  # bounding-box centre, in voxel indices
    dz, dr, dc = volume.spacing_mm
    values, modality, path = volume.values, volume.modality, volume.path

    def image(plane: np.ndarray, spacing: tuple[float, float]) -> DicomImage:
        return DicomImage(values=plane, spacing_mm=spacing, modality=modality, path=path)

    if mode == "largest":
        picked = largest_slices(mask, slices)
        centres = []
        for k in picked:
            rows, cols = np.nonzero(mask[k])
            centres.append(((rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0))
        return Planes(tuple(volume.axial(k) for k in picked), tuple(centres), 0, bag=True)
    if mode == "2.5d":
        step = slab_mm / dz
        planes = tuple(image(_plane(values, 0, kc + s * step), (dr, dc)) for s in (-1, 0, 1))
        return Planes(planes, ((rc, cc),) * 3, 1, bag=False)
    axial = image(_plane(values, 0, kc), (dr, dc))
    coronal = image(_plane(values, 1, rc), (dz, dc))  # rows: slices, cols: columns
    sagittal = image(_plane(values, 2, cc), (dz, dr))  # rows: slices, cols: rows
    return Planes((axial, coronal, sagittal), ((rc, cc), (kc, cc), (kc, rc)), 0, bag=False)


def largest_slices(mask: np.ndarray, k: int = 1) -> list[int]:
    """Indices of the `k` axial slices of largest lesion area, largest first (ties: lower index first).

    A lesion that spans fewer than `k` slices repeats its slices from the largest on, so every
    patient has exactly `k` inputs (the bag's mean then weights the larger sections more; the
    risk set and the patient count are unchanged either way).
    """
    if k < 1:
        raise ValueError(f"slices per lesion must be >= 1, got {k}")
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    order = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] > 0]
    return [order[j % len(order)] for j in range(k)]


def _plane(values: np.ndarray, axis: int, position: float) -> np.ndarray:
    """The plane at fractional index `position` along `axis`, linear between neighbours.

    Outside the volume the plane is the volume's minimum (air for CT), as the in-plane crop
    fills what lies outside the image.
    """
    n = values.shape[axis]
    if position < -0.5 or position > n - 0.5:
        return np.full(np.delete(values.shape, axis), float(values.min()), dtype=np.float32)
    position = min(max(position, 0.0), n - 1.0)
    i0 = int(math.floor(position))
    i1 = min(i0 + 1, n - 1)
    t = position - i0
    a, b = np.take(values, i0, axis=axis), np.take(values, i1, axis=axis)
    return ((1.0 - t) * a + t * b).astype(np.float32)
