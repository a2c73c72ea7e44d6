"""Load one site folder (DICOM files + labels.csv) into preprocessed arrays.

The rows come from labels.csv (`fedrad.client.labels`: its grammar and why a row is left
out); each row's DICOM file is read (`fedrad.common.dicom`), resampled and cropped
(`fedrad.common.preprocess`), and lands in the train, test or unlabelled arrays.

A bad row or file never stops the site: it is recorded in :attr:`SiteData.skipped` with a
reason that names the line and the value, and the rest loads. Only a missing or unusable
labels.csv is fatal (:class:`SiteDataError`). Keeping loaded sites between messages is
`fedrad.client.loaded_sites`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrad.client.labels import Row, SiteDataError, Skipped, read_labels
from fedrad.client.lru import BoundedLRU
from fedrad.client.masks import read_mask
from fedrad.client.series import read_series
from fedrad.client.slices import lesion_planes
from fedrad.common.covariates import COVARIATES, mask_covariates
from fedrad.common.dicom import DicomImage, DicomReadError, read_image
from fedrad.common.preprocess import Preprocessor, Stack

__all__ = ["SiteData", "SiteDataError", "Skipped", "channels", "image_key", "load_site", "row_key", "series_key"]


@dataclass
class SiteData:
    """Preprocessed arrays of one site.

    Attributes:
        name: The site folder's name.
        x_train, y_train: (N, 3, S, S) float32, (N,) int64; labelled train rows.
        x_test, y_test: Labelled test rows, same layout.
        x_unlabelled: (M, 3, S, S) float32; rows with an empty label.
        spacings_mm: (K, 2) float64 (row, col) spacing in mm of every image read.
        skipped: Rows/files left out, in labels.csv order.
        keys_train, keys_test, keys_unlabelled: one content key per image (a hash of the
            file's bytes and its ROI), in array order: what the feature cache is keyed by,
            so a changed file or ROI is never served stale features.
        preprocessing: repr of the preprocessor that made the arrays (spacing, field of
            view, intensity map, windows): part of the feature-cache key, so a changed
            harmonisation map is never served features of the old inputs.
        time_train, time_test: (N,) float64 follow-up in days, aligned with y_train / y_test,
            when the preprocessor's `target` is "survival" (then y is the event: 1 event,
            0 censored); empty otherwise.
        covariates_train, covariates_test, covariates_unlabelled: (N, len(COVARIATES))
            float64, aligned with y_train / y_test / x_unlabelled: each row's mask-derived
            covariates (`fedrad.common.covariates`; NaN for a 2-D image row, which has no mask).
            They stay at the site; with run config `covariates` the Cox head weighs them beside
            the CNN.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_unlabelled: np.ndarray
    spacings_mm: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)
    keys_train: tuple[str, ...] = ()
    keys_test: tuple[str, ...] = ()
    keys_unlabelled: tuple[str, ...] = ()
    preprocessing: str = ""
    time_train: np.ndarray = field(default_factory=lambda: np.zeros(0))
    time_test: np.ndarray = field(default_factory=lambda: np.zeros(0))
    covariates_train: np.ndarray = field(default_factory=lambda: np.zeros((0, len(COVARIATES))))
    covariates_test: np.ndarray = field(default_factory=lambda: np.zeros((0, len(COVARIATES))))
    covariates_unlabelled: np.ndarray = field(default_factory=lambda: np.zeros((0, len(COVARIATES))))

    def summary(self) -> dict:
        """JSON-ready counts (no pixel data) for logs and the server."""
        return {
            "name": self.name,
            "n_train": int(len(self.y_train)),
            "n_test": int(len(self.y_test)),
            "n_unlabelled": int(len(self.x_unlabelled)),
            "n_skipped": len(self.skipped),
            "skipped": [{"file": s.file, "reason": s.reason} for s in self.skipped],
        }


def load_site(
    site_dir: Path,
    preprocessor: Preprocessor | Stack,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    index: str = "labels.csv",
) -> SiteData:
    """Read labels.csv (or another `index` of the same grammar), then read and preprocess every listed image.

    Args:
        site_dir: The site folder.
        preprocessor: Turns each image into a (3, S, S) array.
        on_progress: Called as ``on_progress(done, total)`` after each image
            read attempt (total = rows that passed validation).

    The preprocessor's ``target`` ("label" when it has none; "survival" with `task = survival`)
    picks what a row is scored on: its label, or its time + event (y = event, times in
    ``time_train`` / ``time_test``). A row without the run's target is unlabelled (train) or
    skipped with a reason (test).

    Returns:
        The site's arrays; bad rows/files are in ``skipped``.

    Raises:
        SiteDataError: labels.csv missing, unreadable, or without the required
            columns.
    """
    site_dir = Path(site_dir)
    skipped: list[Skipped] = []
    rows = read_labels(site_dir / index, skipped)
    size = preprocessor.size
    buckets: dict[str, tuple[list[np.ndarray], list[int], list[str]]] = {
        "train": ([], [], []), "test": ([], [], []), "unlabelled": ([], [], []),
    }
    survival = getattr(preprocessor, "target", "label") == "survival"
    times: dict[str, list[float]] = {"train": [], "test": [], "unlabelled": []}
    covariates: dict[str, list[np.ndarray]] = {"train": [], "test": [], "unlabelled": []}
    spacings: list[tuple[float, float]] = []
    for done, row in enumerate(rows, start=1):
        target = row.event if survival else row.label
        if target is None and row.split == "test":
            skipped.append(Skipped(row.image, f"labels.csv line {row.line}: test row has no "
                                   + ("time and event; task = survival scores test rows on them" if survival else
                                      "label (it gives time and event only: run task = survival)")))
            continue
        z = np.full(len(COVARIATES), np.nan)  # a 2-D row has no mask, so no covariate
        if row.series:
            problem, x, spacing, key, z = _series_row(site_dir, row, preprocessor)
        else:
            problem, image = _read_row(site_dir, row)
            spacing = None if image is None else image.spacing_mm
            if problem is None:
                center = None if row.roi_xy is None else (row.roi_xy[1], row.roi_xy[0])
                x = (preprocessor(image, center) if getattr(preprocessor, "slices_per_lesion", 1) == 1
                     else preprocessor.from_bag([image], [center]))  # a 2-D row: its one image k times
                key = image_key(site_dir.joinpath(*row.rel.parts), row.roi_xy)
        if spacing is not None:
            spacings.append(spacing)
        if problem is not None:
            skipped.append(Skipped(row.image, f"labels.csv line {row.line}: {problem}"))
        else:
            bucket = "unlabelled" if target is None else row.split
            buckets[bucket][0].append(x)
            buckets[bucket][1].append(-1 if target is None else target)
            buckets[bucket][2].append(key)
            times[bucket].append(row.time if survival and row.time is not None else np.nan)
            covariates[bucket].append(z)
        if on_progress is not None:
            on_progress(done, len(rows))

    made = [xs[0] for xs, _, _ in buckets.values() if xs]
    n_channels = made[0].shape[0] if made else 3  # an empty split matches the others (a Stack has more than 3)

    def stack(key: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys, _ = buckets[key]
        x = np.stack(xs).astype(np.float32, copy=False) if xs else np.zeros((0, n_channels, size, size), np.float32)
        return x, np.asarray(ys, dtype=np.int64).reshape(-1)

    x_train, y_train = stack("train")
    x_test, y_test = stack("test")
    x_unlabelled, _ = stack("unlabelled")
    return SiteData(
        name=site_dir.resolve().name,
        x_train=x_train, y_train=y_train,
        x_test=x_test, y_test=y_test,
        x_unlabelled=x_unlabelled,
        spacings_mm=np.asarray(spacings, dtype=np.float64).reshape(-1, 2),
        skipped=skipped,
        keys_train=tuple(buckets["train"][2]),
        keys_test=tuple(buckets["test"][2]),
        keys_unlabelled=tuple(buckets["unlabelled"][2]),
        preprocessing=repr(preprocessor),
        time_train=np.asarray(times["train"] if survival else [], dtype=np.float64),
        time_test=np.asarray(times["test"] if survival else [], dtype=np.float64),
        covariates_train=np.asarray(covariates["train"], dtype=np.float64).reshape(-1, len(COVARIATES)),
        covariates_test=np.asarray(covariates["test"], dtype=np.float64).reshape(-1, len(COVARIATES)),
        covariates_unlabelled=np.asarray(covariates["unlabelled"], dtype=np.float64).reshape(-1, len(COVARIATES)),
    )


def image_key(path: Path, roi_xy: tuple[float, float] | None) -> str:
    """Content key of one image row: SHA-256 of the file's bytes and the ROI it is cropped at."""
    digest = hashlib.sha256(path.read_bytes())
    digest.update(repr(roi_xy).encode())
    return digest.hexdigest()[:32]


def _read_row(site_dir: Path, row: Row) -> tuple[str | None, DicomImage | None]:
    """Read the row's image; return (problem or None, image or None)."""
    path = site_dir.joinpath(*row.rel.parts)
    if not path.is_file():
        what = "file not found" if not path.exists() else "not a regular file"
        return f"{what}: {path} (image paths are relative to the site folder)", None
    try:
        image = _read_image_remembered(path)
    except DicomReadError as exc:
        return exc.reason, None
    if row.roi_xy is not None:
        x, y = row.roi_xy
        n_rows, n_cols = image.values.shape
        if not (-0.5 <= x < n_cols - 0.5 and -0.5 <= y < n_rows - 0.5):
            return (
                f"roi (x={x:g}, y={y:g}) px lies outside the image ({n_cols} columns x "
                f"{n_rows} rows); roi_x is the column index, roi_y the row index"
            ), image
    return None, image


def _series_row(site_dir: Path, row: Row, preprocessor: Preprocessor | Stack
                ) -> tuple[str | None, np.ndarray | None, tuple[float, float] | None, str, np.ndarray]:
    """A series row: read the series and its mask, cut the run's planes, preprocess them.

    Returns (problem or None, CNN input or None, in-plane spacing or None, content key, the
    mask's covariates (`fedrad.common.covariates.mask_covariates`, NaN on a problem)). The
    key hashes every file of the series, the mask, the ROI name and the slice mode, so a
    cached input is never served for a changed series, mask or mode.
    """
    series_path = site_dir.joinpath(*row.rel.parts)
    none = np.full(len(COVARIATES), np.nan)
    if row.mask is None:  # the labels grammar refuses such rows; kept for direct callers
        return "series row without a mask", None, None, "", none
    mask_path = site_dir.joinpath(*row.mask.parts)
    mode, slab = getattr(preprocessor, "slice_mode", "largest"), getattr(preprocessor, "slab_mm", 5.0)
    bag = getattr(preprocessor, "slices_per_lesion", 1)
    try:
        volume = read_series(series_path)
        mask = read_mask(mask_path, volume, row.roi_name or None)
    except DicomReadError as exc:
        where = ("" if exc.path == series_path else f"mask {row.mask}: " if exc.path == mask_path
                 else f"series {row.image}, {exc.path.name}: ")
        return where + exc.reason, None, None, "", none
    planes = lesion_planes(volume, mask, mode=mode, slab_mm=slab, slices=bag)
    if len(planes.images) == 1:
        x = preprocessor(planes.images[0], planes.centres_rc[0])
    elif planes.bag:  # slices-per-lesion k: k inputs of 3 channels, largest slice first
        x = preprocessor.from_bag(planes.images, planes.centres_rc)
    else:
        x = preprocessor.from_planes(planes.images, planes.centres_rc, planes.main)
    return (None, x, (float(volume.spacing_mm[1]), float(volume.spacing_mm[2])),
            series_key(series_path, mask_path, row.roi_name, mode, slab, bag),
            mask_covariates(mask, tuple(float(v) for v in volume.spacing_mm), volume.values))


def series_key(series_path: Path, mask_path: Path, roi_name: str, mode: str, slab_mm: float, bag: int) -> str:
    """Content key of one series row: SHA-256 of every file of the series and the mask, the ROI name and the
    slice mode, so a cached input is never served for a changed series, mask or mode."""
    files = sorted(series_path.iterdir()) if series_path.is_dir() else [series_path]
    digest = hashlib.sha256()
    for file in [*files, mask_path]:
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    digest.update(repr((roi_name, mode, slab_mm) if bag == 1 else (roi_name, mode, slab_mm, bag)).encode())
    return digest.hexdigest()[:32]


def row_key(site_dir: Path, row: Row, preprocessor: Preprocessor | Stack) -> str | None:
    """The content key `load_site` gives `row` under `preprocessor`; None when its file is not there.

    Lets a reader of the same labels.csv (`fedrad.client.predict.rows_of`) tell which row each loaded
    input came from, 2-D image and series rows alike.
    """
    path = site_dir.joinpath(*row.rel.parts)
    if not row.series:
        return image_key(path, row.roi_xy) if path.is_file() else None
    if row.mask is None or not path.exists():
        return None
    return series_key(path, site_dir.joinpath(*row.mask.parts), row.roi_name,
                      getattr(preprocessor, "slice_mode", "largest"), getattr(preprocessor, "slab_mm", 5.0),
                      getattr(preprocessor, "slices_per_lesion", 1))


def _read_image_remembered(path: Path) -> DicomImage:
    """`read_image`, remembered per process while the file is unchanged (size and mtime)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    image = _DECODED.get(key)
    if image is None:
        image = read_image(path)  # errors are not remembered
        _DECODED.put(key, image)
    return image


# A site's messages normally decode each file once per run (`fedrad.client.reference` keeps the CNN
# inputs and HU crops of its first read). This memo spares a process the decode where a read
# has no cache folder to keep its results in (`fedrad bench`, `fedrad compare`'s baselines,
# a spacing survey before the run's spacing is chosen). Images are never mutated downstream.
# 256 MB holds ~2,500 160x160 CT slices.
_DECODED: BoundedLRU[DicomImage] = BoundedLRU(256 * 2**20, size=lambda image: image.values.nbytes)


def channels(data: SiteData, which: slice, preprocessing: str) -> SiteData:
    """The arrays of `data` restricted to channels `which` (one part of a `Stack`), as made by `preprocessing`."""
    return dataclasses.replace(data, preprocessing=preprocessing, **{
        name: np.ascontiguousarray(getattr(data, name)[:, which]) for name in ("x_train", "x_test", "x_unlabelled")})
