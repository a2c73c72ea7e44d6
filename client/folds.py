"""Two stratified folds of a site's labelled test split, for cross-fitting.

The test split is the site's held-out labelled data: the model never trained on it, so it
is where calibration (BCTS), BBSE's confusion matrix and a personalised head can be
fitted honestly. It is also where ECE, Brier score and AUC are reported, and a map must
not be scored on the images it was fitted on. So every test image is scored by maps
fitted on the *other* fold (cross-fitting): fold 0 by maps from fold 1 and vice versa.

The folds must be the same in every round and process (the Deployment Engine starts a
fresh process per message): images are ranked by a hash of (seed, content key), per
class, and alternately assigned, not drawn from a random generator's state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

MIN_CALIBRATION = 10  # images a fold needs before a calibration map is fitted on it at all
MIN_PER_CLASS = 2  # ... of which at least this many of every class


def two_folds(keys: Sequence[str], y: np.ndarray, *, seed: int, n_classes: int = 2) -> np.ndarray:
    """Fold id (0 or 1) of each labelled image, stratified by class and balanced within one image.

    `keys` are the images' content keys (row numbers are used where a site has none).
    """
    y = np.asarray(y)
    names = list(keys) if len(keys) == len(y) else [str(i) for i in range(len(y))]
    rank = np.array([hashlib.sha256(f"{seed}:{k}".encode()).hexdigest() for k in names])
    fold = np.zeros(len(y), dtype=int)
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        fold[idx[np.argsort(rank[idx], kind="stable")][1::2]] = 1
    return fold


def can_calibrate(y: np.ndarray, n_classes: int = 2) -> bool:
    """Enough labelled images, of every class, to fit a calibration map."""
    y = np.asarray(y, dtype=int)
    return len(y) >= MIN_CALIBRATION and bool(np.all(np.bincount(y, minlength=n_classes) >= MIN_PER_CLASS))
