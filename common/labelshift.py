"""Label shift: class priors from counts, estimated on unlabelled images, and posterior re-weighting.

Label shift means P(Y) differs between the training population and a site while P(X|Y)
stays the same (a screening centre vs an oncology referral centre). Then the site's
posterior follows from the training posterior by Bayes' rule alone:

    p_site(y|x) ∝ p_train(y|x) · π_site(y) / π_train(y)

so a site needs only its prior π_site. It knows it from labels, or estimates it on its
unlabelled images, two ways:

* `em_prior`: maximum likelihood by EM (Saerens, Latinne & Decaestecker 2002), which
  needs *calibrated* posteriors (see `fedrad.client.calibration`, Alexandari et al. 2020);
* `bbse_prior`: black-box shift estimation (Lipton, Wang & Smola 2018), which inverts the
  confusion matrix of hard predictions measured on held-out labelled data; it needs no
  calibration, only an invertible confusion matrix, and serves as a second opinion.

Plain numpy, no Flower, no torch. Invalid arguments raise ValueError; statistical
failures (EM not converging, a singular confusion matrix) are not errors: the estimate
comes back with `ok = False` and a reason, and the caller falls back to no correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-12  # probabilities are clipped to at least this before any division or log


@dataclass(frozen=True)
class PriorEstimate:
    """An estimated class prior, or why there is none.

    Attributes:
        prior: (K,) probabilities summing to 1; None when the estimate failed.
        iterations: EM iterations used (0 for BBSE).
        reason: Empty when `prior` is usable; otherwise what went wrong, in words.
    """

    prior: np.ndarray | None
    iterations: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.prior is not None


def _check_prior(name: str, prior: np.ndarray, k: int, *, positive: bool) -> np.ndarray:
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (k,) or not np.all(np.isfinite(prior)) or np.any(prior < 0) or abs(prior.sum() - 1) > 1e-6:
        raise ValueError(f"{name} must be {k} non-negative probabilities summing to 1; got {prior.tolist()}.")
    if positive and np.any(prior <= 0):
        raise ValueError(f"{name} must give every class a positive probability (a class with prior 0 cannot be "
                         f"re-weighted); got {prior.tolist()}.")
    return prior


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be an (N, K) array with K >= 2 classes; got shape {probs.shape}.")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probs must be finite and non-negative.")
    probs = np.maximum(probs, EPS)
    return probs / probs.sum(axis=1, keepdims=True)


def prior_from_counts(counts: np.ndarray, *, smoothing: float = 0.0) -> np.ndarray:
    """Class prior from class counts: (n_c + smoothing) / (N + K · smoothing).

    The coordinator forms the training prior this way from the sites' labelled counts;
    `smoothing` > 0 (Laplace) keeps an absent class at a small positive prior, which a
    logit adjustment log(π) needs.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"counts must be K >= 2 non-negative numbers; got {counts.tolist()}.")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0; got {smoothing}.")
    total = counts.sum() + smoothing * counts.size
    if total <= 0:
        raise ValueError("counts are all zero and smoothing is 0: no prior can be formed; give at least one labelled "
                         "image or smoothing > 0.")
    return (counts + smoothing) / total


def logit_adjustment(counts: np.ndarray, tau: float) -> np.ndarray:
    """Additive logit offset τ · log π for the logit-adjusted loss (Menon et al. 2021).

    Training on cross-entropy(logits + τ log π_site, y) makes softmax(logits + τ log π)
    fit the site's labels, so the logits themselves estimate log p(x|y) + const: a head
    averaged over sites is not pulled toward any site's prevalence, and its posterior
    under any prior π is softmax(logits + τ log π). π comes from the site's labelled
    counts with add-one smoothing, so an absent class gives a finite offset.
    """
    if tau < 0:
        raise ValueError(f"logit-adjust (tau) must be >= 0; got {tau}.")
    return tau * np.log(prior_from_counts(counts, smoothing=1.0))


def correct_posteriors(probs: np.ndarray, prior_new: np.ndarray, prior_old: np.ndarray) -> np.ndarray:
    """Re-weight posteriors from prior `prior_old` to `prior_new`: p_new ∝ p_old · π_new / π_old.

    Exact under label shift (Bayes' rule with P(X|Y) unchanged). A class with π_new = 0
    gets posterior 0; every row stays a probability vector (never NaN).
    """
    probs = _check_probs(probs)
    k = probs.shape[1]
    prior_old = _check_prior("prior_old", prior_old, k, positive=True)
    prior_new = _check_prior("prior_new", prior_new, k, positive=False)
    weighted = probs * (prior_new / prior_old)
    return weighted / weighted.sum(axis=1, keepdims=True)


def em_prior(probs: np.ndarray, prior_source: np.ndarray, *, tol: float = 1e-6,
             max_iter: int = 10_000) -> PriorEstimate:
    """EM / maximum-likelihood label shift (Saerens et al. 2002) on unlabelled images.

    `probs` are (N, K) posteriors p_source(y|x) of the target images, calibrated under
    `prior_source`. Each step re-weights them to the current prior estimate (E-step) and
    takes the mean re-weighted posterior as the new prior (M-step); the fixed point is
    the maximum-likelihood prior of the target sample. Stops when no class's prior moves
    by more than `tol`; not converged within `max_iter` steps → no estimate.
    """
    probs = _check_probs(probs)
    prior_source = _check_prior("prior_source", prior_source, probs.shape[1], positive=True)
    if len(probs) == 0:
        return PriorEstimate(None, 0, "no unlabelled images to estimate the prior on")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"tol must be > 0 and max_iter >= 1; got tol={tol}, max_iter={max_iter}.")
    ratio = probs / prior_source
    prior = prior_source.copy()
    for iteration in range(1, max_iter + 1):
        weighted = ratio * prior
        new = (weighted / weighted.sum(axis=1, keepdims=True)).mean(axis=0)
        if not np.all(np.isfinite(new)):
            return PriorEstimate(None, iteration, "EM produced a non-finite prior")
        if np.max(np.abs(new - prior)) < tol:
            return PriorEstimate(new / new.sum(), iteration)
        prior = new
    return PriorEstimate(None, max_iter, f"EM did not converge in {max_iter} iterations (tolerance {tol:g})")


def confusion_given_label(pred: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """M[i, j] = P(ŷ = i | y = j) on labelled data; a class absent from `y` gives a zero column."""
    m = np.zeros((k, k))
    np.add.at(m, (pred, y), 1.0)
    counts = m.sum(axis=0)
    return np.divide(m, counts, out=np.zeros_like(m), where=counts > 0)


MIN_SEPARATION = 0.1  # BBSE's guard: |TPR - FPR| (2 classes) below this and M is too close to singular


def confusion_separation(m: np.ndarray) -> float:
    """How far a confusion matrix M = P(ŷ | y) is from singular, on the scale BBSE's error scales with.

    Two classes: |det M| = |TPR − FPR| (how much more often a malignant image is called
    malignant than a benign one); BBSE divides by it, so an error δ in the prediction rates
    becomes δ / |TPR − FPR| in the prior. More classes: the smallest singular value of M.
    Why not the condition number: for 2 × 2 it stays near 25 at TPR − FPR = 0.04, far
    below any usable threshold, although the inverse amplifies errors 25-fold.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.shape == (2, 2):
        return float(abs(m[1, 1] - m[1, 0]))
    return float(np.linalg.svd(m, compute_uv=False).min())


def bbse_prior(probs_labelled: np.ndarray, y_labelled: np.ndarray, probs_target: np.ndarray, *,
               min_separation: float = MIN_SEPARATION) -> PriorEstimate:
    """Black-box shift estimation (Lipton et al. 2018) with hard predictions ŷ = argmax p.

    Under label shift P(ŷ | y) is the same at the target as on the labelled data, so the
    target's prediction rates μ = P_target(ŷ) satisfy μ = M π_target with
    M = P(ŷ | y) from `confusion_given_label`. Solves for π, clips negatives to 0 and
    renormalises. A class absent from the labelled data, or predictions that barely
    separate the classes (`confusion_separation` below `min_separation`: |TPR − FPR| < 0.1
    for two classes) → no estimate, with the reason in words.

    `probs_labelled` must not come from a map fitted on the same labels (the confusion
    matrix would be optimistic): the caller cross-fits (`fedrad.client.site_shift`).
    """
    probs_labelled = _check_probs(probs_labelled)
    probs_target = _check_probs(probs_target)
    k = probs_labelled.shape[1]
    y = np.asarray(y_labelled).astype(int)
    if probs_target.shape[1] != k or y.shape != (len(probs_labelled),) or np.any((y < 0) | (y >= k)):
        raise ValueError(f"BBSE needs labels in [0, {k}) for every labelled row and {k}-class target "
                         f"probabilities; got labels {y.shape}, target {probs_target.shape}.")
    if min_separation <= 0:
        raise ValueError(f"min_separation must be > 0; got {min_separation}.")
    if len(probs_target) == 0:
        return PriorEstimate(None, 0, "no unlabelled images to estimate the prior on")
    absent = [c for c in range(k) if not np.any(y == c)]
    if absent:
        return PriorEstimate(None, 0, f"class(es) {absent} absent from the labelled calibration images")
    m = confusion_given_label(probs_labelled.argmax(axis=1), y, k)
    separation = confusion_separation(m)
    if separation < min_separation:
        what = "|TPR − FPR|" if k == 2 else "the confusion matrix's smallest singular value"
        return PriorEstimate(None, 0, f"refused: the predictions barely separate the classes ({what} = "
                                      f"{separation:.3f} < {min_separation:g}), so inverting the confusion "
                                      "matrix would amplify noise into the prior")
    mu = np.bincount(probs_target.argmax(axis=1), minlength=k) / len(probs_target)
    prior = np.clip(np.linalg.solve(m, mu), 0.0, None)
    if prior.sum() <= 0:
        return PriorEstimate(None, 0, "BBSE gave no positive class prior")
    return PriorEstimate(prior / prior.sum())
