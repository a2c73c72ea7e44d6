"""A site's preprocessed arrays kept on its own disk, so a new process does not re-read every DICOM.

Reading and resampling a thousand DICOM files costs seconds; loading the arrays they
became costs a tenth of that. In Flower's Deployment Engine every message runs in a fresh
process, and in the Simulation Engine each actor serves every site in turn, so without
this file each of them decodes the whole site again.

The file (`<cache dir>/pixels-<key>.npz`, in the site's work folder, never sent anywhere)
is keyed by the preprocessing (spacing, field of view, intensity map, windows) and the
folder's fingerprint (path, size and mtime of every file), so a changed, added or removed
file or a changed setting reads the folder afresh. At most `KEEP` files per site (raw
inputs, HU crops, harmonised inputs): writing a new one removes the oldest. Writes are atomic (temporary
file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fedrad.client.dataset import SiteData, Skipped
from fedrad.common.covariates import COVARIATES

log = logging.getLogger("fedrad.site")
_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "x_unlabelled", "spacings_mm", "time_train", "time_test",
           "covariates_train", "covariates_test", "covariates_unlabelled")
_KEYS = ("keys_train", "keys_test", "keys_unlabelled")
KEEP = 3  # array files kept per site: the raw inputs, the HU crops and the harmonised inputs of one run


def store_path(cache_dir: Path, preprocessing: str, fingerprint: tuple) -> Path:
    """Where the arrays of this folder state under this preprocessing live (and this set of mask covariates:
    a file made before a covariate was added lacks its column)."""
    return keyed_path(cache_dir, "pixels", (preprocessing, fingerprint, tuple(COVARIATES)))


def keyed_path(cache_dir: Path, kind: str, key: tuple) -> Path:
    """`<cache dir>/<kind>-<digest of key>.npz`: one file per key; `write_npz` prunes by kind."""
    return Path(cache_dir) / f"{kind}-{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.npz"


def save(path: Path, data: SiteData) -> None:
    """Write `data` to `path` atomically; keep only the `KEEP` newest array files of the site."""
    write_npz(path, {**{k: getattr(data, k) for k in _ARRAYS},
                     **{k: np.array(getattr(data, k), dtype=str) for k in _KEYS},
                     "name": np.array(data.name), "preprocessing": np.array(data.preprocessing),
                     "skipped": np.array(json.dumps([[s.file, s.reason] for s in data.skipped]))},
              keep=KEEP)


def write_npz(path: Path, arrays: dict[str, np.ndarray], *, keep: int) -> None:
    """Write `arrays` to `path` atomically (temporary file, then rename), then remove all but the
    `keep` newest files of the same kind (same name up to the first "-") in that folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    kind = path.name.split("-", 1)[0]
    others = sorted((p for p in path.parent.glob(f"{kind}-*.npz") if p != path), key=lambda p: p.stat().st_mtime_ns)
    for old in others[:max(0, len(others) - (keep - 1))]:
        old.unlink(missing_ok=True)


def load(path: Path) -> SiteData | None:
    """The arrays saved at `path`, or None when there are none (or the file is unreadable)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return SiteData(
                name=str(f["name"]), preprocessing=str(f["preprocessing"]),
                skipped=[Skipped(file, reason) for file, reason in json.loads(str(f["skipped"]))],
                **{k: f[k] for k in _ARRAYS}, **{k: tuple(str(v) for v in f[k]) for k in _KEYS},
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # torn or foreign: read again
        log.warning("ignoring the unreadable array file %s (%s); reading the site folder again", path, err)
        return None
