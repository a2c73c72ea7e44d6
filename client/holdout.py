"""The calibration hold-out: labelled training rows a site keeps out of training.

BCTS calibration and BBSE's confusion matrix must be measured on labelled images the
model did not train on (a network is over-confident on its own training images), and
the site's test split is where ECE is reported, so it cannot be used either. A site
therefore sets aside `calibration-fraction` of its labelled training rows, per class
(stratified), and never trains on them.

The choice must be the same in every round, including in the Deployment Engine where
each message is a fresh process: rows are ranked by a hash of (seed, content key), not
by a random generator's state or by file order. When the hold-out would be too small to
calibrate anything (fewer than MIN_CALIBRATION images, or fewer than MIN_PER_CLASS of a
class), nothing is held out: the site trains on everything and reports that it could
not calibrate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from client.train import Inputs

MIN_CALIBRATION = 10  # held-out images needed to fit BCTS (2 parameters) at all
MIN_PER_CLASS = 2  # ... of which at least this many of every class


def calibration_mask(keys: Sequence[str], y: np.ndarray, fraction: float, *, seed: int,
                     n_classes: int = 2) -> np.ndarray:
    """Boolean mask over the labelled training rows: True = held out for calibration.

    Per class c, the round(fraction · n_c) rows with the smallest SHA-256 of
    (seed, key) are held out; `keys` are the rows' content keys (row numbers are used
    where a site has none). All False when the hold-out would be too small.
    """
    y = np.asarray(y)
    if not 0 <= fraction < 1:
        raise ValueError(f"calibration fraction must be in [0, 1); got {fraction}.")
    names = list(keys) if len(keys) == len(y) else [str(i) for i in range(len(y))]
    rank = np.array([hashlib.sha256(f"{seed}:{k}".encode()).hexdigest() for k in names])
    mask = np.zeros(len(y), dtype=bool)
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        take = int(round(fraction * idx.size))
        if take:
            mask[idx[np.argsort(rank[idx], kind="stable")[:take]]] = True
    counts = np.bincount(y[mask], minlength=n_classes)
    if mask.sum() < MIN_CALIBRATION or np.any(counts < MIN_PER_CLASS):
        return np.zeros(len(y), dtype=bool)
    return mask


def subset_inputs(inputs: Inputs, idx: np.ndarray) -> Inputs:
    """The same inputs restricted to rows `idx` (row i of the subset = row idx[i])."""
    rows = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return Inputs(len(rows), inputs.n_views, lambda sel, view: inputs.batch(rows[sel], view), inputs.forward)
