"""The sites this process has loaded, kept while their folders are unchanged.

A Simulation Engine actor serves its site message after message, and `fedrad compare`
runs many federations over the same sites; re-reading and re-preprocessing every DICOM
for each would dominate once the frozen prefix is cached. So loaded arrays are kept here
(the latest `MAX_LOADED` sites) and, with a cache folder, on the site's own disk
(`fedrad.client.site_store`), keyed by the folder's fingerprint and the preprocessing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fedrad.client import site_store
from fedrad.client.dataset import SiteData, load_site
from fedrad.common.preprocess import Preprocessor


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

    Actors (and `fedrad compare`'s baselines) serve several sites in turn, so a few are kept
    (a site of a few hundred 96-px images is tens of MB). With `cache_dir`
    (the site's own cache folder) the arrays are also kept on disk (`fedrad.client.site_store`), so
    the next process loads them instead of decoding every DICOM again. `make(fingerprint)`,
    when given, is tried before reading the folder on a miss (None: it cannot;
    `fedrad.client.reference` derives harmonised inputs from kept HU crops this way).
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
    data = _LOADED.get(_loaded_key(site_dir, preprocessing, fingerprint))
    if data is None and cache_dir is not None:
        data = site_store.load(site_store.store_path(cache_dir, preprocessing, fingerprint))
        if data is not None:
            remember_site(site_dir, data, fingerprint=fingerprint)
    return data


def remember_site(site_dir: Path, data: SiteData, *, fingerprint: tuple, cache_dir: Path | None = None) -> None:
    """Let `load_site_cached` find `data` (made from `site_dir` as it was at `fingerprint`).

    Kept in this process and, with `cache_dir`, in the site's array store: for arrays made by
    another pass over the same files (`fedrad.client.reference` reads every image for the HU
    histogram and keeps the CNN inputs of that same read).
    """
    while len(_LOADED) >= MAX_LOADED:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[_loaded_key(site_dir, data.preprocessing, fingerprint)] = data
    if cache_dir is not None:
        site_store.save(site_store.store_path(cache_dir, data.preprocessing, fingerprint), data)


def _loaded_key(site_dir: Path, preprocessing: str, fingerprint: tuple) -> tuple:
    return (str(Path(site_dir).resolve()), preprocessing, fingerprint)
