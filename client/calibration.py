"""Bias-corrected temperature scaling (BCTS; Alexandari, Kundaje & Shrikumar 2020).

EM label-shift estimation (`fedrad.common.labelshift.em_prior`) is only as good as the
posteriors it is given: a network trained with cross-entropy is usually over-confident
and, under a prior it was not trained for, biased per class. BCTS fits one temperature
T > 0 and one bias per class on held-out labelled images,

    q(y|x) = softmax(z(x) / T + b),   b[0] = 0,

by minimising the negative log-likelihood. Alexandari et al. show that the per-class
biases (absent from plain temperature scaling) are what makes EM accurate.

Held-out images may come from a population whose prior `prior_fit` differs from the
reference prior `prior_ref` the calibrated posteriors should describe (a site's
labelled images vs the federation's training prior). The fit then scores
softmax(z/T + b + log π_fit − log π_ref), so T and b learn the model's miscalibration,
not the site's prevalence: q stays calibrated under `prior_ref`, and the site's prior is
left to EM.

Held-out sets at a hospital are small (tens of images), and tens of well-separated images
make plain maximum likelihood run off (T → 0 with a huge bias fits them perfectly). The
fit is therefore a MAP estimate under a Gaussian prior centred on the identity map,
log T ~ N(0, LOG_T_SD²) and b ~ N(0, BIAS_SD²): with a few dozen images it moves
cautiously, with hundreds the data decide. No Flower, no torch: scipy's L-BFGS-B on two or
a few parameters.

`class_balanced` (run-config `bcts-balanced`) weights each held-out image by n / (K · n_y),
so every class carries the same total weight: at a 0.9-prevalence site the positives
otherwise decide the temperature, and a map fitted where one class dominates may be off
where the deployment prior is near 0.5. The weighted set is a population with a uniform
prior (the same images per class), so the fit's prior offset then uses the uniform prior
in place of `prior_fit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))  # temperature in [0.05, 20]
BIAS_BOUND = 20.0
LOG_T_SD = 0.5  # prior SD of log T: T in [0.37, 2.7] at two SD
BIAS_SD = 1.0  # prior SD of each bias (logits)


@dataclass(frozen=True)
class BCTS:
    """A fitted calibration map: posteriors softmax(z / temperature + bias)."""

    temperature: float
    bias: np.ndarray  # (K,), bias[0] == 0

    def logits(self, z: np.ndarray) -> np.ndarray:
        """Calibrated log-odds (unnormalised log-probabilities) of raw logits `z` (N, K)."""
        return np.asarray(z, dtype=np.float64) / self.temperature + self.bias

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """Calibrated posteriors (N, K) of raw logits `z` (N, K)."""
        return softmax(self.logits(z), axis=1)

    @classmethod
    def identity(cls, k: int) -> BCTS:
        return cls(1.0, np.zeros(k))


def _validate(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y)
    if z.ndim != 2 or z.shape[1] < 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"logits must be a finite (N, K) array with K >= 2; got shape {z.shape}.")
    if y.shape != (len(z),) or not np.issubdtype(y.dtype, np.integer) or np.any((y < 0) | (y >= z.shape[1])):
        raise ValueError(f"labels must be {len(z)} integers in [0, {z.shape[1]}); got {y.shape} {y.dtype}.")
    return z, y.astype(int)


def fit_bcts(z: np.ndarray, y: np.ndarray, *, prior_fit: np.ndarray | None = None,
             prior_ref: np.ndarray | None = None, min_per_class: int = 2, bias: bool = True,
             class_balanced: bool = False) -> BCTS:
    """Fit BCTS on held-out logits `z` (N, K) with labels `y` (N,).

    Args:
        z: Raw logits (any per-row additive constant is irrelevant), e.g. log p_train(y|x).
        y: Integer labels of the same images.
        prior_fit: Class prior of these held-out images (e.g. from their counts); with
            `prior_ref`, the fit corrects for the difference (see module docstring).
        prior_ref: Prior the calibrated posteriors should describe.
        min_per_class: Each class needs at least this many held-out images.
        bias: False fits the temperature alone (plain temperature scaling, b = 0).
        class_balanced: Weight each image n / (K · n_y) so each class carries equal total
            weight; `prior_fit` is then taken as uniform (the weighted set's prior).

    Raises:
        ValueError: Bad shapes/labels, or a class with fewer than `min_per_class` images
            (calibrating a class never seen would be a guess); the message says which.
    """
    z, y = _validate(z, y)
    k = z.shape[1]
    counts = np.bincount(y, minlength=k)
    if np.any(counts < min_per_class):
        raise ValueError(f"BCTS needs at least {min_per_class} held-out images of every class; got class counts "
                         f"{counts.tolist()}.")
    offset = np.zeros(k)
    if prior_fit is not None and prior_ref is not None:
        pf, pr = np.asarray(prior_fit, dtype=np.float64), np.asarray(prior_ref, dtype=np.float64)
        if pf.shape != (k,) or pr.shape != (k,) or np.any(pf <= 0) or np.any(pr <= 0):
            raise ValueError(f"prior_fit and prior_ref must be {k} positive probabilities; got {pf}, {pr}.")
        if class_balanced:
            pf = np.full(k, 1.0 / k)
        offset = np.log(pf) - np.log(pr)
    n = len(y)
    weight = n / (k * counts[y]) if class_balanced else np.ones(n)  # sums to n either way
    onehot = np.eye(k)[y] * weight[:, None]
    precision = np.array([1 / LOG_T_SD**2] + [1 / BIAS_SD**2] * (k - 1)) / n  # the prior, per image

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_t, b = theta[0], np.concatenate([[0.0], theta[1:]])
        t = np.exp(log_t)
        u = z / t + b + offset
        logp = log_softmax(u, axis=1)
        loss = -np.sum(onehot * logp) / n + 0.5 * float(theta @ (precision * theta))
        du = (weight[:, None] * np.exp(logp) - onehot) / n
        grad = np.concatenate([[np.sum(du * (-z / t))], du.sum(axis=0)[1:]]) + precision * theta
        return float(loss), grad

    bounds = [LOG_T_BOUNDS] + [(-BIAS_BOUND, BIAS_BOUND) if bias else (0.0, 0.0)] * (k - 1)
    result = minimize(loss_and_grad, np.zeros(k), jac=True, method="L-BFGS-B", bounds=bounds)
    if not np.all(np.isfinite(result.x)):
        raise ValueError("BCTS optimisation produced non-finite parameters.")
    return BCTS(float(np.exp(result.x[0])), np.concatenate([[0.0], result.x[1:]]))
