"""Frozen-prefix feature cache: the frozen layers run once per image, not once per epoch.

In partial fine-tuning the stem and the first K blocks never change during a run, so their
output for an image is a constant. A site computes it once, keeps it on its own disk (in
the Deployment Engine every message is a fresh process, so memory alone would be lost)
and, in long-lived processes (the Simulation Engine's actors), also in a bounded
in-memory layer. Every later epoch and round only runs the trainable suffix.

What is cached, exactly: for each image, the prefix output of each augmentation *view*.
Augmentation is the 8 exact dihedral views (flips and 90-degree rotations of the pixel
grid). A convolution stack with TF padding is not flip-equivariant, so a flipped feature
map is not the features of the flipped image; instead all 8 views are cached for training
images (1 for test/unlabelled ones) and an epoch picks a view at random, exactly as the
uncached loop does. Results are the same as without the cache (tested).

The cache key covers everything the prefix output depends on: each image's content key
(file bytes + ROI, from `fedrad.client.dataset`), the preprocessing config, the backbone weights
file, the freeze point, the number of views and the prefix-BN mode (with AdaBN, the
re-estimated statistics are stored with the features). Change any of them and the cache
is a miss, never stale. Nothing here is ever sent anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrad.client.lru import BoundedLRU

# Bumped whenever the prefix's numbers change, even by float rounding (2: 1x1 layers on
# small maps became matrix products, common/pointwise.py): one fedrad version then gives the
# same results whatever an older run left in a site's cache.
CACHE_VERSION = 2


def cache_folder(work_dir: Path | str) -> Path:
    """Where a site keeps what it can recompute (prefix features, preprocessed arrays): `<work-dir>/cache`."""
    return Path(work_dir) / "cache"


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View 0..7 of an image batch: horizontal flip if view >= 4, then view % 4 quarter turns."""
    if view >= 4:
        x = torch.flip(x, dims=[-1])
    return torch.rot90(x, view % 4, dims=[-2, -1]) if view % 4 else x


def cache_key(**parts: object) -> str:
    """Stable hash of the settings the prefix output depends on, and of the code computing it.

    torch's version is part of it: another torch brings other kernels, hence other rounding.
    """
    blob = json.dumps({"version": CACHE_VERSION, "torch": torch.__version__, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Entry:
    """Cached prefix outputs: row i of `features` belongs to image `keys[i]`."""

    keys: list[str]
    features: np.ndarray  # (N, views, C, h, w) float32
    extra: dict[str, np.ndarray]  # e.g. re-estimated prefix BN statistics

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + sum(a.nbytes for a in self.extra.values()))


class MemoryLayer(BoundedLRU[Entry]):
    """A bounded LRU of cache entries, by file path. Bounded by `limit_bytes` (0 = off)."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(limit_bytes, size=lambda entry: entry.nbytes)


# One memory layer per process: a Simulation Engine actor serves its site round after round.
# Its bound is set from run config `cache-memory-mb` on every use.
MEMORY = MemoryLayer(limit_bytes=0)


class FeatureCache:
    """Prefix features of one site for one cache key, in `folder/prefix-<key>.npz`."""

    def __init__(self, folder: Path, key: str, *, memory_mb: int = 0) -> None:
        self.path = Path(folder) / f"prefix-{key}.npz"
        MEMORY.limit_bytes = memory_mb * 2**20
        self.hits = 0
        self.misses = 0

    def _load(self) -> Entry:
        entry = MEMORY.get(self.path)
        if entry is not None:
            return entry
        if self.path.is_file():
            with np.load(self.path) as data:
                keys = [str(k) for k in data["keys"]]
                extra = {k[len("extra/"):]: data[k] for k in data.files if k.startswith("extra/")}
                entry = Entry(keys, data["features"], extra)
        else:
            entry = Entry([], np.zeros((0,), np.float32), {})
        MEMORY.put(self.path, entry)
        return entry

    def _save(self, entry: Entry) -> None:
        """Atomic write: a crash mid-write leaves the old file, never a torn one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, keys=np.array(entry.keys), features=entry.features,
                     **{f"extra/{k}": v for k, v in entry.extra.items()})
        os.replace(tmp, self.path)
        MEMORY.put(self.path, entry)

    def extra(self) -> dict[str, np.ndarray]:
        return self._load().extra

    def set_extra(self, extra: dict[str, np.ndarray]) -> None:
        entry = self._load()
        self._save(Entry(entry.keys, entry.features, extra))

    def get(self, keys: Sequence[str], compute: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        """Features for `keys` in order; `compute(indices)` makes the missing ones, (n, views, C, h, w)."""
        entry = self._load()
        index = {k: i for i, k in enumerate(entry.keys)}
        missing = [i for i, k in enumerate(keys) if k not in index]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            new = compute(missing).astype(np.float32, copy=False)
            features = new if entry.features.size == 0 else np.concatenate([entry.features, new])
            entry = Entry(entry.keys + [keys[i] for i in missing], features, entry.extra)
            self._save(entry)
            index = {k: i for i, k in enumerate(entry.keys)}
        if not keys:
            return np.zeros((0,), np.float32)
        return entry.features[[index[k] for k in keys]]
