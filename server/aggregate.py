"""The coordinator's arithmetic: validate a site's update, then the sample-weighted mean.

Kept apart from Flower so it can be tested exactly: what goes in is {name: array} per site
plus its number of training examples; what comes out is the weighted mean of exactly the
expected names. Anything else in an update (an unknown name, a wrong shape or dtype,
NaN/Inf) rejects the whole update: a partly applied update is worse than none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class UpdateRejected(ValueError):
    """A site's update failed validation; it never reaches the global model."""


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: np.dtype


def spec_of(arrays: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """The expected shape/dtype of each shared array, taken from the global model."""
    return {k: ArraySpec(tuple(a.shape), np.dtype(a.dtype)) for k, a in arrays.items()}


def validate_update(site: str, arrays: Mapping[str, np.ndarray], num_examples: object,
                    expected: Mapping[str, ArraySpec]) -> None:
    """Raise UpdateRejected naming the site and the first problem found."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"site {site}: wrong keys (missing {missing[:3]}, unexpected {extra[:3]}).")
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)) or not num_examples > 0:
        raise UpdateRejected(f"site {site}: num-examples must be a positive number; got {num_examples!r}.")
    for key, spec in expected.items():
        array = arrays[key]
        if tuple(array.shape) != spec.shape:
            raise UpdateRejected(f"site {site}: '{key}' has shape {tuple(array.shape)}, expected {spec.shape}.")
        if array.dtype != spec.dtype:
            raise UpdateRejected(f"site {site}: '{key}' has dtype {array.dtype}, expected {spec.dtype}.")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise UpdateRejected(f"site {site}: '{key}' contains NaN or Inf.")


def weighted_average(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Sum_i n_i * w_i / Sum_i n_i per key, accumulated in float64, returned in each key's dtype."""
    if not updates:
        raise ValueError("weighted_average needs at least one update.")
    total = float(sum(n for _, n in updates))
    first = updates[0][0]
    out: dict[str, np.ndarray] = {}
    for key, ref in first.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for arrays, n in updates:
            acc += arrays[key].astype(np.float64) * (n / total)
        out[key] = acc.astype(ref.dtype)
    return out


def update_distance(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 distance between an update and the global model it started from, over all shared keys (float64)."""
    total = 0.0
    for key, ref in reference.items():
        diff = arrays[key].astype(np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def norm_outliers(distances: Sequence[float], factor: float) -> list[float | None]:
    """For each update: the others' median distance when its own exceeds `factor` times it, else None.

    Each update is judged against the median of the *other* updates' distances from the
    global model (leave-one-out), so one huge update cannot drag the yardstick up, and the
    rule still works with two sites. It needs at least one other update with a non-zero
    distance; `factor <= 0` turns the rule off.
    """
    out: list[float | None] = []
    for i, dist in enumerate(distances):
        others = [d for j, d in enumerate(distances) if j != i]
        if factor <= 0 or not others:
            out.append(None)
            continue
        median = float(np.median(others))
        out.append(median if median > 0 and dist > factor * median else None)
    return out


def capped_weights(weights: Sequence[float], cap: float) -> list[float]:
    """Each weight at most `cap` x the median of the *other* weights (cap 0: unchanged).

    Leave-one-out, like `norm_outliers`: a site claiming 1e12 examples cannot raise its own
    yardstick, and the rule works with two sites. One site's share of the average is then at
    most cap x median / (cap x median + the others' weights).
    """
    out = []
    for i, weight in enumerate(weights):
        others = [w for j, w in enumerate(weights) if j != i]
        if cap <= 0 or not others:
            out.append(float(weight))
            continue
        out.append(float(min(weight, cap * float(np.median(others)))))
    return out
