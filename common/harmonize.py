"""Intensity harmonisation maths: fixed-bin HU histograms, pooling, quantiles, the matching map.

Why: scanners differ in HU calibration (offset), kernel and noise, so the same tissue
reaches the CNN at different intensities at different sites. Here a site describes its
intensities only by a histogram with FIXED bins over a FIXED HU range (counts, nothing
per image), the coordinator adds the sites' histograms into a reference, and each site
maps its own intensities onto the reference with a monotone piecewise-linear map:

* ``quantile``: full histogram matching. The landmarks are every knot of both
  piecewise-linear CDFs, so the site's p-quantile lands exactly on the reference's
  p-quantile for every p (up to the bin resolution of the histograms themselves).
* ``landmarks``: Nyúl–Udupa standardisation. The landmarks are the percentiles
  ``NYUL_PERCENTILES`` (pc1 = 1 %, the deciles, pc2 = 99 %) of each histogram, with linear
  extrapolation beyond pc1/pc2; fewer knots, so less sensitive to local differences in
  content between sites.
* ``median``: the same standardisation with the median as the only landmark: with the
  lung/tissue split (`split_landmarks`) two landmarks, so an affine map that corrects a
  calibration offset (and gain) but keeps each site's contrast, texture and noise as they
  are. Matching whole distributions also equalises their spread, which a sharp kernel or
  noise widens and a smooth kernel narrows: that stretches the texture of smooth sites.

No Flower and no torch here: counts in, HU maps out. Units are HU throughout.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence

import numpy as np

HU_MIN = -1024.0
"""Lower edge of the first bin (HU): air."""
HU_MAX = 3072.0
"""Upper edge of the last bin (HU): the top of the 12-bit CT range."""
BIN_HU = 2.0
"""Bin width in HU: the resolution of every histogram and hence of the matching."""
N_BINS = int(round((HU_MAX - HU_MIN) / BIN_HU))  # 2048
MIN_PIXELS = 10_000
"""A site histogram with fewer pixels is too thin to estimate quantiles from (about 4
crops of 48 x 48 px); it is left out of the reference and the site is not harmonised."""
NYUL_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
METHODS = ("quantile", "landmarks", "median")


class HarmonizationWarning(UserWarning):
    """A site's intensities cannot be used (too few pixels, constant image): nothing crashes,
    the site is left out of the reference and/or keeps its own intensities."""


def bin_edges() -> np.ndarray:
    """The fixed bin edges (N_BINS + 1,) in HU, shared by every site and the coordinator."""
    return np.linspace(HU_MIN, HU_MAX, N_BINS + 1)


def intensity_histogram(values: np.ndarray) -> np.ndarray:
    """Counts of `values` (HU, any shape) in the fixed bins: int64 (N_BINS,).

    Values below HU_MIN or at/above HU_MAX are counted in the first/last bin (a CT value
    outside the 12-bit range is a clipped one). NaNs (no CT value, e.g. a non-CT image)
    are not counted.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    index = np.clip(np.floor((v - HU_MIN) / BIN_HU).astype(np.int64), 0, N_BINS - 1)
    return np.bincount(index, minlength=N_BINS).astype(np.int64)


def validate_counts(counts: np.ndarray, *, what: str = "histogram") -> np.ndarray:
    """Counts as int64 (N_BINS,) or a ValueError saying what is wrong (shape, sign, type)."""
    array = np.asarray(counts)
    if array.shape != (N_BINS,):
        raise ValueError(f"{what} must have the {N_BINS} fixed bins of {BIN_HU:g} HU over "
                         f"[{HU_MIN:g}, {HU_MAX:g}) HU; got shape {array.shape}.")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array != np.round(array)):
        raise ValueError(f"{what} must hold non-negative whole counts.")
    return array.astype(np.int64)


def pool_histograms(histograms: Sequence[np.ndarray]) -> np.ndarray:
    """The reference histogram: the bin-wise sum of the sites' counts (exact, int64).

    Because the bins are fixed, this equals the histogram of all sites' pixels
    concatenated: pooling loses nothing and needs nothing but counts.
    """
    if not histograms:
        raise ValueError("pool_histograms needs at least one site histogram; got none.")
    return np.sum([validate_counts(h, what=f"histogram {i}") for i, h in enumerate(histograms)], axis=0)


def histogram_problem(counts: np.ndarray, *, min_pixels: int = MIN_PIXELS) -> str | None:
    """Why these counts cannot serve for matching, or None when they can."""
    counts = validate_counts(counts)
    total = int(counts.sum())
    if total < min_pixels:
        return f"only {total} pixels in its lesion fields of view (at least {min_pixels} are needed)"
    if int(np.count_nonzero(counts)) < 2:
        value = HU_MIN + BIN_HU * (int(np.argmax(counts)) + 0.5)
        return f"all its intensities fall in one {BIN_HU:g} HU bin (about {value:.0f} HU): a constant image"
    return None


def cdf_knots(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The histogram's CDF as knots (HU edges, cumulative fraction): linear within each bin."""
    counts = validate_counts(counts).astype(np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("an empty histogram has no quantiles.")
    return bin_edges(), np.concatenate([[0.0], np.cumsum(counts) / total])


def quantiles(counts: np.ndarray, probs: np.ndarray | Sequence[float]) -> np.ndarray:
    """Quantiles (HU) of a histogram at probabilities `probs` in [0, 1].

    Pixels are taken as spread uniformly inside their bin, so the CDF is piecewise linear
    and so is the quantile function; where the CDF is flat (empty bins) the lowest HU with
    that cumulative fraction is returned.
    """
    edges, cdf = cdf_knots(counts)
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    # bin b holds quantile p when cdf[b] < p <= cdf[b + 1]; p = 0 belongs to the first non-empty bin
    b = np.searchsorted(cdf[1:], p, side="left")
    b = np.where(p <= 0.0, int(np.argmax(cdf[1:] > 0)), np.minimum(b, N_BINS - 1))
    lo, hi = cdf[b], cdf[b + 1]
    frac = np.where(hi > lo, (p - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return edges[b] + np.clip(frac, 0.0, 1.0) * BIN_HU


def summary(counts: np.ndarray) -> dict[str, float]:
    """Intensity summary of a histogram for the shift table: pixel count and p5/p50/p95 (HU)."""
    counts = validate_counts(counts)
    if counts.sum() == 0:
        return {"pixels": 0, "p5_hu": math.nan, "p50_hu": math.nan, "p95_hu": math.nan}
    p5, p50, p95 = quantiles(counts, [0.05, 0.5, 0.95])
    return {"pixels": int(counts.sum()), "p5_hu": float(p5), "p50_hu": float(p50), "p95_hu": float(p95)}


def matching_landmarks(source: np.ndarray, reference: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(source HU, reference HU) landmark pairs of the map from `source` to `reference` counts.

    ``quantile``: the map is x -> Q_ref(F_src(x)). Both the source CDF and the reference
    quantile function are piecewise linear, with knots at the source's bin edges and at the
    source quantiles of the reference's knot fractions; with all those knots as landmarks
    the piecewise-linear map IS that composition, so the site's p-quantile goes exactly to
    the reference's p-quantile. Landmarks span the source's own range only.
    ``landmarks``: the Nyúl–Udupa percentiles of both histograms.
    ``median``: the medians only (one landmark; a shift).
    """
    if method == "quantile":
        edges, cdf_s = cdf_knots(source)
        _, cdf_r = cdf_knots(reference)
        lo, hi = quantiles(source, [0.0, 1.0])
        xs = np.unique(np.concatenate([edges, quantiles(source, cdf_r)]))
        xs = xs[(xs >= lo) & (xs <= hi)]
        return xs, quantiles(reference, np.interp(xs, edges, cdf_s))
    if method in ("landmarks", "median"):
        probs = np.asarray(NYUL_PERCENTILES if method == "landmarks" else [50.0]) / 100.0
        src, first = np.unique(quantiles(source, probs), return_index=True)
        return src, quantiles(reference, probs)[first]
    raise ValueError(f"The 'method' parameter must be one of {METHODS}. Got {method!r} instead.")


MIN_PART_PIXELS = 1_000
"""With a split, a side of it with fewer pixels (at the site or in the reference) is left
unchanged rather than matched on a handful of pixels."""


def split_landmarks(source: np.ndarray, reference: np.ndarray, method: str, split_hu: float, *,
                    site: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """Landmarks matched separately below and above the bin edge nearest `split_hu`.

    Each side is matched as its own histogram, so the map depends on the shape of the
    intensity distribution within each tissue class (aerated lung below, soft tissue
    above for CT at about -400 HU), not on how much of each class the fields of view hold.
    Every target landmark below the split stays below it and every one above stays above,
    so the joined map is monotone. A side too thin to match keeps the identity there.
    """
    source, reference = validate_counts(source), validate_counts(reference)
    k = int(np.clip(round((split_hu - HU_MIN) / BIN_HU), 1, N_BINS - 1))
    edge = HU_MIN + k * BIN_HU
    xs, ys = [], []
    for lo, hi, part in ((HU_MIN, edge, slice(0, k)), (edge, HU_MAX, slice(k, N_BINS))):
        src, ref = np.zeros_like(source), np.zeros_like(reference)
        src[part], ref[part] = source[part], reference[part]
        if min(src.sum(), ref.sum()) >= MIN_PART_PIXELS and min(np.count_nonzero(src), np.count_nonzero(ref)) >= 2:
            x, y = matching_landmarks(src, ref, method)
        else:
            if src.sum() > 0:
                warnings.warn(HarmonizationWarning(
                    f"site {site}: too few pixels between {lo:g} and {hi:g} HU (site {int(src.sum())}, reference "
                    f"{int(ref.sum())}; {MIN_PART_PIXELS} needed) to match that range; it is left unchanged."),
                    stacklevel=3)
            x, y = np.array([lo, hi]), np.array([lo, hi])
        xs.append(x)
        ys.append(y)
    x, first = np.unique(np.concatenate(xs), return_index=True)
    return x, np.maximum.accumulate(np.concatenate(ys)[first])


class IntensityMatch:
    """Monotone piecewise-linear map of a site's HU onto the federated reference (HU -> HU).

    MONAI style: `__init__` stores validated landmarks, `__call__` is pure. Between
    landmarks the map is linear; beyond the first/last landmark it continues with the
    slope of the end segment for ``landmarks`` (Nyúl–Udupa's extrapolation beyond pc1/pc2)
    and with slope 1 for ``quantile``, whose landmarks span the site's whole histogram, so
    only values outside the site's own range (rare test pixels) are shifted, not squeezed.
    Build one with :meth:`fit`.

    Attributes:
        source_hu: Landmarks on the site's scale (HU), strictly increasing.
        target_hu: Where they go on the reference scale (HU), non-decreasing.
        method: ``quantile``, ``landmarks`` or ``identity``.
    """

    def __init__(self, source_hu: np.ndarray, target_hu: np.ndarray, *, method: str) -> None:
        src = np.asarray(source_hu, dtype=np.float64)
        dst = np.asarray(target_hu, dtype=np.float64)
        if src.ndim != 1 or src.shape != dst.shape or src.size < 2:
            raise ValueError(f"source_hu and target_hu must be 1-D of the same length >= 2; got {src.shape}, "
                             f"{dst.shape}.")
        if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
            raise ValueError("landmarks must be finite HU values.")
        if np.any(np.diff(src) <= 0) or np.any(np.diff(dst) < 0):
            raise ValueError("source landmarks must increase strictly and target landmarks must not decrease "
                             "(the map must be monotone).")
        self.source_hu, self.target_hu, self.method = src, dst, method

    @classmethod
    def identity(cls) -> IntensityMatch:
        """The map that changes nothing (a site that cannot be harmonised)."""
        return cls(np.array([HU_MIN, HU_MAX]), np.array([HU_MIN, HU_MAX]), method="identity")

    @classmethod
    def fit(cls, source: np.ndarray, reference: np.ndarray, *, method: str = "quantile",
            split_hu: float | None = None, site: str = "?") -> IntensityMatch:
        """The map taking histogram `source` (the site's) onto `reference` (the pool's).

        With `split_hu`, the HU range is cut at that bin edge and each side is matched on its
        own (`split_landmarks`), so that a site whose fields of view hold more tissue than
        the pool's (e.g. more and larger lesions) does not get its tissue dragged towards
        lung values to make the fractions agree.

        A site whose histogram is unusable (too few pixels, a constant image) gets a
        :class:`HarmonizationWarning` naming it and the identity map: it trains on its own
        intensities rather than on a map estimated from nothing.
        """
        if method not in METHODS:
            raise ValueError(f"The 'method' parameter of IntensityMatch.fit must be one of {METHODS}. "
                             f"Got {method!r} instead.")
        for what, counts in (("its", source), ("the reference", reference)):
            problem = histogram_problem(counts)
            if problem is not None:
                who = f"site {site}: " + ("" if what == "its" else "the reference histogram has ")
                warnings.warn(HarmonizationWarning(
                    f"{who}{problem}; its intensities are left unchanged (no harmonisation). "
                    "Check that its images are CT with lesion ROIs inside the image."), stacklevel=2)
                return cls.identity()
        if split_hu is None or not HU_MIN < split_hu < HU_MAX:
            src, dst = matching_landmarks(source, reference, method)
        else:
            src, dst = split_landmarks(source, reference, method, split_hu, site=site)
        if len(src) == 1:  # one landmark (the median, no split): a shift
            src, dst = np.append(src, src[0] + 1.0), np.append(dst, dst[0] + 1.0)
        return cls(src, dst, method=method)

    def digest(self) -> str:
        """Short hash of the landmarks: part of every cache key that depends on the CNN input."""
        blob = self.method.encode() + self.source_hu.tobytes() + self.target_hu.tobytes()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"IntensityMatch(method={self.method}, landmarks={len(self.source_hu)}, digest={self.digest()})"

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """Map HU values (any shape) to reference HU; float32, same shape, input untouched."""
        x = np.asarray(hu, dtype=np.float64)
        src, dst = self.source_hu, self.target_hu
        y = np.interp(x, src, dst)
        if self.method in ("landmarks", "median"):  # Nyúl–Udupa: the end segments continue
            lo_slope = (dst[1] - dst[0]) / (src[1] - src[0])
            hi_slope = (dst[-1] - dst[-2]) / (src[-1] - src[-2])
        else:  # outside the site's own range: shift only, keep contrast
            lo_slope = hi_slope = 1.0
        y = np.where(x < src[0], dst[0] + (x - src[0]) * lo_slope, y)
        y = np.where(x > src[-1], dst[-1] + (x - src[-1]) * hi_slope, y)
        return y.astype(np.float32)
