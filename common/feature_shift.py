"""Shift score maths: feature moments in a shared projection, pooling, the Fréchet distance.

Why: covariate shift between sites is a difference between their feature distributions
(the seed's domain divergence). A site may not send features, only aggregates: the mean
and covariance of its penultimate features after a fixed projection to a few dimensions
(`projection`, drawn by the coordinator and sent to every site, so all sites measure in
the same coordinates). The coordinator pools the sites' moments exactly (law of total
covariance) and scores each site by the Fréchet distance between the Gaussian with its
moments and the Gaussian with the pooled moments:

    FD^2 = |mu_s - mu_p|^2 + tr(S_s + S_p - 2 (S_s^1/2 S_p S_s^1/2)^1/2)

(the squared 2-Wasserstein distance between the two Gaussians, the quantity FID reports).
0 means the site looks like the federation; larger means more shifted.

No Flower and no torch here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 8
"""A site with fewer images sends no moments: the mean of a handful of images is too close
to the images themselves, and the covariance is too noisy to score."""


@dataclass(frozen=True)
class Moments:
    """First and second moments of n feature vectors (population covariance, ddof 0).

    Attributes:
        n: Number of vectors.
        mean: (k,) mean.
        cov: (k, k) covariance, symmetric positive semi-definite.
    """

    n: int
    mean: np.ndarray
    cov: np.ndarray

    def __post_init__(self) -> None:
        k = np.asarray(self.mean).shape
        if len(k) != 1 or np.asarray(self.cov).shape != (k[0], k[0]):
            raise ValueError(f"Moments need mean (k,) and cov (k, k); got {np.shape(self.mean)} and "
                             f"{np.shape(self.cov)}.")
        if self.n < 1:
            raise ValueError(f"Moments need n >= 1 vectors; got {self.n}.")


def projection(n_features: int, dim: int, *, seed: int) -> np.ndarray:
    """A fixed random projection (dim, n_features) with orthonormal rows, from `seed`.

    Orthonormal rows keep distances honest (no axis is stretched); the coordinator draws it
    once per run and sends it to the sites.
    """
    if not 1 <= dim <= n_features:
        raise ValueError(f"The 'dim' parameter of projection must be in [1, {n_features}]. Got {dim!r} instead.")
    gaussian = np.random.default_rng(seed).standard_normal((n_features, dim))
    q, r = np.linalg.qr(gaussian)
    return (q * np.sign(np.diag(r))).T.astype(np.float32)  # sign fix: unique for a given draw


def moments(z: np.ndarray) -> Moments:
    """Moments of the rows of z (n, k)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or len(z) < 1:
        raise ValueError(f"moments needs an (n, k) array with n >= 1; got shape {z.shape}.")
    mean = z.mean(axis=0)
    centred = z - mean
    return Moments(len(z), mean, centred.T @ centred / len(z))


def pool_moments(parts: Sequence[Moments]) -> Moments:
    """Moments of the union of the parts' vectors, from the parts' moments only.

    Law of total covariance: the pooled covariance is the weighted mean of the within-part
    covariances plus the covariance of the part means. Exact, not an approximation.
    """
    if not parts:
        raise ValueError("pool_moments needs at least one site's moments; got none.")
    n = np.array([p.n for p in parts], dtype=np.float64)
    w = n / n.sum()
    mean = np.einsum("i,ik->k", w, np.stack([p.mean for p in parts]))
    within = np.einsum("i,ijk->jk", w, np.stack([p.cov for p in parts]))
    d = np.stack([p.mean for p in parts]) - mean
    between = np.einsum("i,ij,ik->jk", w, d, d)
    return Moments(int(n.sum()), mean, within + between)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((a + a.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: Moments, b: Moments) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(a.mean, a.cov) and N(b.mean, b.cov).

    The cross term tr((A^1/2 B A^1/2)^1/2) is computed from the eigenvalues of the symmetric
    PSD matrix A^1/2 B A^1/2, which stays real and stable where a general matrix square root
    of A B may pick up imaginary round-off.
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"Moments of different dimension: {a.mean.shape} vs {b.mean.shape}.")
    root_a = _sqrt_psd(a.cov)
    cross = np.linalg.eigvalsh(root_a @ b.cov @ root_a)
    trace_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    diff = a.mean - b.mean
    value = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_cross)
    return max(value, 0.0)


def shift_scores(sites: Mapping[str, Moments]) -> dict[str, float]:
    """Each site's Fréchet distance to the pooled distribution of all the given sites."""
    if not sites:
        return {}
    pooled = pool_moments(list(sites.values()))
    return {name: frechet_distance(m, pooled) for name, m in sites.items()}
