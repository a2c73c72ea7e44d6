"""Load one site folder (DICOM files + labels.csv) into preprocessed arrays.

A site folder looks like::

    site_a/
        labels.csv          image,label,split[,roi_x,roi_y]
        scans/0001.dcm ...

* ``image``: path relative to the site folder ("/" or "\\" separators);
  absolute paths and ".." are refused so labels.csv cannot reach outside.
* ``label``: ``0``/``1`` (``0.0``/``1.0`` accepted), or empty = unlabelled.
* ``split``: ``train`` or ``test`` (case-insensitive). Unlabelled rows must be
  ``train`` (they feed semi-supervised/label-shift estimation); a ``test`` row
  without a label cannot be scored and is skipped.
* ``roi_x``, ``roi_y`` (optional): lesion centre in input pixel indices,
  x = column, y = row, 0-based, (x, y) = centre of that pixel; fractions
  allowed. Both empty (or the columns absent) = image centre.

A bad row or file never stops the site: it is recorded in
:attr:`SiteData.skipped` with a reason that names the line and the value, and
the rest loads. Only a missing or unusable labels.csv is fatal
(:class:`SiteDataError`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from client.lru import BoundedLRU
from common.dicom import DicomImage, DicomReadError, read_image
from common.preprocess import Preprocessor, Stack

LABEL_COLUMNS = ("image", "label", "split", "roi_x", "roi_y")
REQUIRED_COLUMNS = ("image", "label", "split")
_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
_SPLITS = ("train", "test")
_DRIVE = re.compile(r"^[A-Za-z]:")


class SiteDataError(ValueError):
    """The site cannot be loaded at all (labels.csv missing or malformed)."""


@dataclass(frozen=True)
class Skipped:
    """One row or file left out, and why.

    Attributes:
        file: The image path as written in labels.csv, or "labels.csv:<line>"
            when the row itself is bad (label, split, roi, empty image cell).
        reason: What was wrong, naming the line and the offending value.
    """

    file: str
    reason: str


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


@dataclass(frozen=True)
class _Row:
    """A labels.csv row that passed validation."""

    line: int
    image: str  # as written
    rel: PurePosixPath
    label: int | None
    split: str
    roi_xy: tuple[float, float] | None


def load_site(
    site_dir: Path,
    preprocessor: Preprocessor | Stack,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> SiteData:
    """Read labels.csv, then read and preprocess every listed image.

    Args:
        site_dir: The site folder.
        preprocessor: Turns each image into a (3, S, S) array.
        on_progress: Called as ``on_progress(done, total)`` after each image
            read attempt (total = rows that passed validation).

    Returns:
        The site's arrays; bad rows/files are in ``skipped``.

    Raises:
        SiteDataError: labels.csv missing, unreadable, or without the required
            columns.
    """
    site_dir = Path(site_dir)
    skipped: list[Skipped] = []
    rows = _read_labels(site_dir / "labels.csv", skipped)
    size = preprocessor.size
    buckets: dict[str, tuple[list[np.ndarray], list[int], list[str]]] = {
        "train": ([], [], []), "test": ([], [], []), "unlabelled": ([], [], []),
    }
    spacings: list[tuple[float, float]] = []
    for done, row in enumerate(rows, start=1):
        problem, image = _read_row(site_dir, row)
        if image is not None:
            spacings.append(image.spacing_mm)
        if problem is not None:
            skipped.append(Skipped(row.image, f"labels.csv line {row.line}: {problem}"))
        else:
            center = None if row.roi_xy is None else (row.roi_xy[1], row.roi_xy[0])
            bucket = "unlabelled" if row.label is None else row.split
            buckets[bucket][0].append(preprocessor(image, center))
            buckets[bucket][1].append(-1 if row.label is None else row.label)
            buckets[bucket][2].append(image_key(site_dir.joinpath(*row.rel.parts), row.roi_xy))
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
    )


def image_key(path: Path, roi_xy: tuple[float, float] | None) -> str:
    """Content key of one image row: SHA-256 of the file's bytes and the ROI it is cropped at."""
    digest = hashlib.sha256(path.read_bytes())
    digest.update(repr(roi_xy).encode())
    return digest.hexdigest()[:32]


def _read_row(site_dir: Path, row: _Row) -> tuple[str | None, DicomImage | None]:
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


def _read_image_remembered(path: Path) -> DicomImage:
    """`read_image`, remembered per process while the file is unchanged (size and mtime)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    image = _DECODED.get(key)
    if image is None:
        image = read_image(path)  # errors are not remembered
        _DECODED.put(key, image)
    return image


# A site's messages normally decode each file once per run (`client.reference` keeps the CNN
# inputs and HU crops of its first read). This memo spares a process the decode where a read
# has no cache folder to keep its results in (`fedrad bench`, `fedrad compare`'s baselines,
# a spacing survey before the run's spacing is chosen). Images are never mutated downstream.
# 256 MB holds ~2,500 160x160 CT slices.
_DECODED: BoundedLRU[DicomImage] = BoundedLRU(256 * 2**20, size=lambda image: image.values.nbytes)


def _read_labels(csv_path: Path, skipped: list[Skipped]) -> list[_Row]:
    """Parse and validate labels.csv; bad rows go to ``skipped``."""
    expected = "expected columns: image,label,split (optional: roi_x,roi_y)"
    if not csv_path.is_file():
        raise SiteDataError(f"{csv_path}: labels.csv not found; each site folder needs one ({expected})")
    rows: list[_Row] = []
    first_line: dict[PurePosixPath, int] = {}
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                unknown = [h for h in header if h not in LABEL_COLUMNS]
                raise SiteDataError(
                    f"{csv_path}: missing required column(s) {', '.join(missing)}; header has "
                    f"{header or 'nothing'}"
                    + (f" (unrecognised: {', '.join(unknown)})" if unknown else "")
                    + f"; {expected}"
                )
            index = {name: header.index(name) for name in LABEL_COLUMNS if name in header}
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue  # blank line
                line = reader.line_num

                def get(name: str, cells: list[str] = cells) -> str:
                    column = index.get(name, len(cells))
                    return cells[column].strip() if column < len(cells) else ""

                parsed = _parse_row(line, get, skipped)
                if parsed is None:
                    continue
                if parsed.rel in first_line:
                    skipped.append(Skipped(
                        parsed.image,
                        f"labels.csv line {line}: duplicate of line {first_line[parsed.rel]} "
                        "(same image); only the first row is used",
                    ))
                    continue
                first_line[parsed.rel] = line
                rows.append(parsed)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SiteDataError(f"{csv_path}: not a readable UTF-8 CSV file ({exc}); {expected}") from exc
    return rows


def _parse_row(line: int, get: Callable[[str], str], skipped: list[Skipped]) -> _Row | None:
    """Validate one row; on failure record why and return None."""
    where = f"labels.csv:{line}"
    image = get("image")
    if not image:
        skipped.append(Skipped(where, f"labels.csv line {line}: empty 'image' cell"))
        return None
    rel = PurePosixPath(image.replace("\\", "/"))
    if rel.is_absolute() or _DRIVE.match(image) or ".." in rel.parts or rel == PurePosixPath("."):
        skipped.append(Skipped(
            image,
            f"labels.csv line {line}: image path {image!r} must be relative to the site folder "
            "and stay inside it (no absolute paths, no '..')",
        ))
        return None
    raw_label = get("label")
    if raw_label and raw_label not in _LABELS:
        skipped.append(Skipped(
            where, f"labels.csv line {line} ({image}): label must be 0, 1 or empty, got {raw_label!r}"
        ))
        return None
    label = _LABELS.get(raw_label)
    split = get("split").lower()
    if split not in _SPLITS:
        skipped.append(Skipped(
            where, f"labels.csv line {line} ({image}): split must be 'train' or 'test', got {get('split')!r}"
        ))
        return None
    if split == "test" and label is None:
        skipped.append(Skipped(
            where, f"labels.csv line {line} ({image}): test row has no label; a test image must be "
            "labelled 0 or 1 (put unlabelled images in the train split)"
        ))
        return None
    raw_x, raw_y = get("roi_x"), get("roi_y")
    roi_xy = None
    if raw_x or raw_y:
        try:
            roi_xy = (float(raw_x), float(raw_y))
            if not all(math.isfinite(v) for v in roi_xy):
                raise ValueError
        except ValueError:
            skipped.append(Skipped(
                where, f"labels.csv line {line} ({image}): roi_x and roi_y must both be numbers "
                f"(pixel column, row) or both empty, got roi_x={raw_x!r}, roi_y={raw_y!r}"
            ))
            return None
    return _Row(line, image, rel, label, split, roi_xy)


def folder_fingerprint(site_dir: Path) -> tuple:
    """(relative path, size, mtime) of every file under the site folder: changes when any file does."""
    entries = []
    for root, _, files in os.walk(site_dir):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            entries.append((os.path.relpath(os.path.join(root, name), site_dir), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


_LOADED: dict[tuple, SiteData] = {}
MAX_LOADED = 8  # sites remembered per process: an actor (or an in-process federation) serves several in turn


def load_site_cached(site_dir: Path, preprocessor: Preprocessor, *, cache_dir: Path | None = None,
                     make: Callable[[tuple], SiteData | None] | None = None) -> SiteData:
    """`load_site`, remembered per process while the folder is unchanged (the latest `MAX_LOADED` sites).

    A Simulation Engine actor serves its site message after message; re-reading and
    re-preprocessing every DICOM for each message would dominate a round once the
    frozen prefix is cached. Actors (and `fedrad compare`'s baselines) serve several sites in turn,
    so a few are kept (a site of a few hundred 96-px images is tens of MB). With `cache_dir`
    (the site's own cache folder) the arrays are also kept on disk (`client.site_store`), so
    the next process loads them instead of decoding every DICOM again. `make(fingerprint)`,
    when given, is tried before reading the folder on a miss (None: it cannot;
    `client.reference` derives harmonised inputs from kept HU crops this way).
    """
    fingerprint = folder_fingerprint(Path(site_dir))
    data = kept_site(site_dir, repr(preprocessor), fingerprint, cache_dir)
    if data is None:
        made = None if make is None else make(fingerprint)
        data = made if made is not None else load_site(site_dir, preprocessor)
        remember_site(site_dir, data, fingerprint=fingerprint, cache_dir=cache_dir)
    return data


def kept_site(site_dir: Path, preprocessing: str, fingerprint: tuple, cache_dir: Path | None) -> SiteData | None:
    """The arrays of `site_dir` (as it was at `fingerprint`) under `preprocessing` if already at hand:
    in this process, or in the site's array store under `cache_dir`. Never reads the folder."""
    from client import site_store

    data = _LOADED.get(_loaded_key(site_dir, preprocessing, fingerprint))
    if data is None and cache_dir is not None:
        data = site_store.load(site_store.store_path(cache_dir, preprocessing, fingerprint))
        if data is not None:
            remember_site(site_dir, data, fingerprint=fingerprint)
    return data


def remember_site(site_dir: Path, data: SiteData, *, fingerprint: tuple, cache_dir: Path | None = None) -> None:
    """Let `load_site_cached` find `data` (made from `site_dir` as it was at `fingerprint`).

    Kept in this process and, with `cache_dir`, in the site's array store: for arrays made by
    another pass over the same files (`client.reference` reads every image for the HU
    histogram and keeps the CNN inputs of that same read).
    """
    from client import site_store

    while len(_LOADED) >= MAX_LOADED:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[_loaded_key(site_dir, data.preprocessing, fingerprint)] = data
    if cache_dir is not None:
        site_store.save(site_store.store_path(cache_dir, data.preprocessing, fingerprint), data)


def _loaded_key(site_dir: Path, preprocessing: str, fingerprint: tuple) -> tuple:
    return (str(Path(site_dir).resolve()), preprocessing, fingerprint)


def channels(data: SiteData, which: slice, preprocessing: str) -> SiteData:
    """The arrays of `data` restricted to channels `which` (one part of a `Stack`), as made by `preprocessing`."""
    return dataclasses.replace(data, preprocessing=preprocessing, **{
        name: np.ascontiguousarray(getattr(data, name)[:, which]) for name in ("x_train", "x_test", "x_unlabelled")})
