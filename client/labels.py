"""The labels.csv grammar: which rows of a site's index are valid, and why a row is left out.

A site folder looks like::

    site_a/
        labels.csv          image,label,split[,roi_x,roi_y]   (2-D rows)
                            series,mask,label,split[,roi_name] (series rows)
        scans/0001.dcm ...
        ct/0001/ (a folder of slices, or one multi-frame file) + masks/0001.seg.dcm ...

* ``image``: path relative to the site folder ("/" or "\\" separators);
  absolute paths and ".." are refused so labels.csv cannot reach outside.
* ``label``: ``0``/``1`` (``0.0``/``1.0`` accepted), or empty = unlabelled.
* ``split``: ``train`` or ``test`` (case-insensitive). Unlabelled rows must be
  ``train`` (they feed semi-supervised/label-shift estimation); a ``test`` row
  without a label cannot be scored and is skipped.
* ``roi_x``, ``roi_y`` (optional): lesion centre in input pixel indices,
  x = column, y = row, 0-based, (x, y) = centre of that pixel; fractions
  allowed. Both empty (or the columns absent) = image centre.
* ``series`` (instead of ``image``): a folder of one series' slice files, or one
  multi-frame file (`fedrad.client.series`); ``mask`` (required with it): the lesion
  as DICOM SEG, RT Structure Set or NIfTI (`fedrad.client.masks`), and ``roi_name``
  the ROI (RTSTRUCT) or segment label (SEG) when the file holds several. A row gives
  ``image`` or ``series``, not both; both kinds may share one labels.csv.
* ``time`` (days, > 0) and ``event`` (``1`` = event, ``0`` = censored): a survival endpoint,
  instead of or beside ``label`` (the ``label`` column may then be absent). Both or neither;
  a test row needs a label or a time + event. Which target a run reads (`task`) is
  `fedrad.client.dataset`'s choice: a row without that run's target is unlabelled (train)
  or skipped with a reason (test).

A bad row is recorded as a :class:`Skipped` with a reason that names the line and the
value, and the rest is read. Only a missing or unusable labels.csv is fatal
(:class:`SiteDataError`). Reading the images the rows name is `fedrad.client.dataset`'s job.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

LABEL_COLUMNS = ("image", "label", "split", "roi_x", "roi_y", "series", "mask", "roi_name", "time", "event")
REQUIRED_COLUMNS = ("split",)  # and image or series, and label or time + event
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


@dataclass(frozen=True)
class Row:
    """A labels.csv row that passed validation (`image` as written, `rel` the path it names)."""

    line: int
    image: str  # as written
    rel: PurePosixPath
    label: int | None
    split: str
    roi_xy: tuple[float, float] | None
    series: bool = False  # `rel` names a series (folder or multi-frame file), not one image
    mask: PurePosixPath | None = None  # series rows: the lesion mask
    roi_name: str = ""  # series rows: ROI name (RTSTRUCT) or segment label (SEG); "" = the only one
    time: float | None = None  # survival: follow-up in days (> 0), with `event`
    event: int | None = None  # survival: 1 = event observed at `time`, 0 = censored there


def read_labels(csv_path: Path, skipped: list[Skipped]) -> list[Row]:
    """Parse and validate labels.csv; bad rows go to ``skipped``."""
    expected = ("expected columns: image,label,split (optional: roi_x,roi_y) or series,mask,label,split "
                "(optional: roi_name); time,event (survival) instead of or beside label")
    if not csv_path.is_file():
        raise SiteDataError(f"{csv_path}: labels.csv not found; each site folder needs one ({expected})")
    rows: list[Row] = []
    first_line: dict[PurePosixPath, int] = {}
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if "image" not in header and "series" not in header:
                missing.insert(0, "image (or series)")
            if "label" not in header and not {"time", "event"} <= set(header):
                missing.append("label (or time and event)")
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


def _parse_row(line: int, get: Callable[[str], str], skipped: list[Skipped]) -> Row | None:
    """Validate one row; on failure record why and return None."""
    where = f"labels.csv:{line}"
    image, series = get("image"), get("series")
    if image and series:
        skipped.append(Skipped(where, f"labels.csv line {line}: both 'image' ({image}) and 'series' ({series}) "
                               "are given; a row is one 2-D image or one series"))
        return None
    if not image and not series:
        skipped.append(Skipped(where, f"labels.csv line {line}: empty 'image' cell"))
        return None
    image = image or series
    rel = _inside(line, "image" if not series else "series", image, skipped)
    if rel is None:
        return None
    mask = None
    if series:
        raw_mask = get("mask")
        if not raw_mask:
            skipped.append(Skipped(image, f"labels.csv line {line}: series row without a 'mask' (DICOM SEG, "
                                   "RTSTRUCT or NIfTI lesion mask); a series row needs its lesion"))
            return None
        mask = _inside(line, "mask", raw_mask, skipped)
        if mask is None:
            return None
    raw_label = get("label")
    if raw_label and raw_label not in _LABELS:
        skipped.append(Skipped(
            where, f"labels.csv line {line} ({image}): label must be 0, 1 or empty, got {raw_label!r}"
        ))
        return None
    label = _LABELS.get(raw_label)
    survival = _survival(line, image, get("time"), get("event"), skipped)
    if survival is None:
        return None
    split = get("split").lower()
    if split not in _SPLITS:
        skipped.append(Skipped(
            where, f"labels.csv line {line} ({image}): split must be 'train' or 'test', got {get('split')!r}"
        ))
        return None
    if split == "test" and label is None and survival == (None, None):
        skipped.append(Skipped(
            where, f"labels.csv line {line} ({image}): test row has no label; a test image must be "
            "labelled 0 or 1, or give time and event (put unlabelled images in the train split)"
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
    return Row(line, image, rel, label, split, roi_xy, series=bool(series), mask=mask, roi_name=get("roi_name"),
               time=survival[0], event=survival[1])


def _survival(line: int, image: str, raw_time: str, raw_event: str, skipped: list[Skipped]
              ) -> tuple[float | None, int | None] | None:
    """(time, event) of a row, (None, None) when it gives neither; None (recorded why) when they are bad."""
    if not raw_time and not raw_event:
        return None, None
    where = f"labels.csv:{line}"
    try:
        time = float(raw_time)
    except ValueError:
        time = math.nan
    problems = []
    if not (math.isfinite(time) and time > 0):
        problems.append(f"time must be a number of days > 0, got {raw_time!r}")
    if raw_event not in _LABELS:
        problems.append(f"event must be 1 (event) or 0 (censored), got {raw_event!r}")
    if problems:
        skipped.append(Skipped(where, f"labels.csv line {line} ({image}): " + "; ".join(problems)
                               + " (time and event go together)"))
        return None
    return time, _LABELS[raw_event]


def _inside(line: int, column: str, written: str, skipped: list[Skipped]) -> PurePosixPath | None:
    """The path as written, if it stays inside the site folder; else record why and return None."""
    rel = PurePosixPath(written.replace("\\", "/"))
    if rel.is_absolute() or _DRIVE.match(written) or ".." in rel.parts or rel == PurePosixPath("."):
        skipped.append(Skipped(
            written,
            f"labels.csv line {line}: {column} path {written!r} must be relative to the site folder "
            "and stay inside it (no absolute paths, no '..')",
        ))
        return None
    return rel
