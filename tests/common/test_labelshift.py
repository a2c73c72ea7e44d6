"""Label-shift maths on problems with known answers: two Gaussians with an exact Bayes posterior."""

import numpy as np
import pytest

from fedrad.common.labelshift import (
    bbse_prior,
    confusion_given_label,
    confusion_separation,
    correct_posteriors,
    em_prior,
    prior_from_counts,
)


def gaussian_mixture(n: int, prior_pos: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """x | y=0 ~ N(-1, 1), x | y=1 ~ N(+1, 1); exactly round(n · prior_pos) positives."""
    y = np.zeros(n, dtype=int)
    y[: round(n * prior_pos)] = 1
    rng.shuffle(y)
    return rng.normal(np.where(y == 1, 1.0, -1.0), 1.0), y


def bayes_posterior(x: np.ndarray, prior_pos: float) -> np.ndarray:
    """Exact p(y|x) for the mixture above: log-odds 2x + logit(prior)."""
    logit = 2 * x + np.log(prior_pos / (1 - prior_pos))
    p1 = 1 / (1 + np.exp(-logit))
    return np.stack([1 - p1, p1], axis=1)


@pytest.mark.parametrize("target", [0.1, 0.2, 0.5, 0.8])
def test_em_recovers_the_target_prior_from_exact_source_posteriors(target):
    rng = np.random.default_rng(0)
    x, y = gaussian_mixture(20_000, target, rng)
    est = em_prior(bayes_posterior(x, 0.5), np.array([0.5, 0.5]))
    assert est.ok and est.reason == ""
    assert est.prior.sum() == pytest.approx(1.0)
    assert abs(est.prior[1] - y.mean()) < 0.02


@pytest.mark.parametrize("source, target", [(0.3, 0.7), (0.6, 0.15)])
def test_bbse_recovers_the_target_prior(source, target):
    rng = np.random.default_rng(1)
    xs, ys = gaussian_mixture(20_000, source, rng)
    xt, yt = gaussian_mixture(20_000, target, rng)
    est = bbse_prior(bayes_posterior(xs, source), ys, bayes_posterior(xt, source))
    assert est.ok
    assert abs(est.prior[1] - yt.mean()) < 0.02


def test_em_without_shift_stays_at_the_source_prior():
    rng = np.random.default_rng(2)
    x, y = gaussian_mixture(20_000, 0.3, rng)
    est = em_prior(bayes_posterior(x, 0.3), np.array([0.7, 0.3]))
    assert abs(est.prior[1] - 0.3) < 0.02


def test_posterior_correction_arithmetic():
    probs = np.array([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    out = correct_posteriors(probs, np.array([0.8, 0.2]), np.array([0.5, 0.5]))
    # odds are multiplied by (0.2/0.8) / (0.5/0.5) = 1/4
    assert out[0] == pytest.approx([0.8, 0.2])
    assert out[1, 1] == pytest.approx((0.8 / 0.2 / 4) / (1 + 0.8 / 0.2 / 4))
    assert out[2, 1] == pytest.approx((0.1 / 0.9 / 4) / (1 + 0.1 / 0.9 / 4))
    assert np.allclose(out.sum(axis=1), 1.0)
    # same prior: unchanged; correcting to the Bayes prior of a mixture gives its exact posterior
    assert np.allclose(correct_posteriors(probs, np.array([0.3, 0.7]), np.array([0.3, 0.7])), probs)
    x = np.linspace(-3, 3, 13)
    assert np.allclose(correct_posteriors(bayes_posterior(x, 0.5), np.array([0.9, 0.1]), np.array([0.5, 0.5])),
                       bayes_posterior(x, 0.1))


def test_correction_to_a_zero_prior_is_finite():
    out = correct_posteriors(np.array([[1.0, 0.0], [0.3, 0.7]]), np.array([0.0, 1.0]), np.array([0.5, 0.5]))
    assert np.all(np.isfinite(out)) and np.allclose(out[:, 1], 1.0)


def test_prior_from_counts_and_smoothing():
    assert prior_from_counts(np.array([30, 10])) == pytest.approx([0.75, 0.25])
    assert prior_from_counts(np.array([4, 0]), smoothing=1.0) == pytest.approx([5 / 6, 1 / 6])
    with pytest.raises(ValueError, match="all zero"):
        prior_from_counts(np.array([0, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        prior_from_counts(np.array([3, -1]))


def test_em_that_cannot_converge_returns_no_estimate():
    rng = np.random.default_rng(3)
    x, _ = gaussian_mixture(500, 0.2, rng)
    est = em_prior(bayes_posterior(x, 0.5), np.array([0.5, 0.5]), max_iter=2)
    assert not est.ok and "did not converge in 2 iterations" in est.reason


def test_em_on_no_images_returns_no_estimate():
    est = em_prior(np.zeros((0, 2)), np.array([0.5, 0.5]))
    assert not est.ok and "no unlabelled images" in est.reason


def test_bbse_degenerate_inputs_return_no_estimate():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    absent = bbse_prior(probs, np.array([0, 0, 0]), probs)
    assert not absent.ok and "absent" in absent.reason
    constant = np.array([[0.9, 0.1]] * 4)  # predicts class 0 for everything: P(ŷ|y) has a zero row
    singular = bbse_prior(constant, np.array([0, 1, 0, 1]), probs)
    assert not singular.ok and "|TPR − FPR| = 0.000 < 0.1" in singular.reason


def _rates(tpr: float, fpr: float, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Labelled posteriors whose hard predictions have exactly this TPR and FPR on n images per class."""
    pred = np.r_[np.arange(n) < round(fpr * n), np.arange(n) < round(tpr * n)].astype(int)
    return np.stack([1.0 - (0.2 + 0.6 * pred), 0.2 + 0.6 * pred], axis=1), np.r_[np.zeros(n), np.ones(n)]


def test_bbse_guard_judges_tpr_minus_fpr_not_the_condition_number():
    target = np.array([[0.3, 0.7]] * 30 + [[0.8, 0.2]] * 70)
    weak, y = _rates(0.54, 0.50)  # TPR − FPR = 0.04: cond(M) is only ~25, yet the inverse is useless
    assert np.linalg.cond(confusion_given_label(weak.argmax(1), y.astype(int), 2)) < 100
    refused = bbse_prior(weak, y, target)
    assert not refused.ok and "refused" in refused.reason and "0.040 < 0.1" in refused.reason
    usable, y = _rates(0.60, 0.45)  # 0.15: above the guard, an estimate
    assert bbse_prior(usable, y, target).ok
    assert not bbse_prior(usable, y, target, min_separation=0.2).ok
    assert confusion_separation(np.array([[0.7, 0.2], [0.3, 0.8]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="min_separation"):
        bbse_prior(usable, y, target, min_separation=0)


def test_confusion_given_label_columns_are_conditional_rates():
    m = confusion_given_label(np.array([0, 1, 1, 1, 0]), np.array([0, 0, 1, 1, 1]), 2)
    assert m == pytest.approx(np.array([[0.5, 1 / 3], [0.5, 2 / 3]]))


@pytest.mark.parametrize("probs, prior, match", [
    (np.array([0.5, 0.5]), np.array([0.5, 0.5]), "probs must be an \\(N, K\\) array"),
    (np.array([[0.5, np.nan]]), np.array([0.5, 0.5]), "finite"),
    (np.array([[0.5, 0.5]]), np.array([1.0, 0.0]), "positive probability"),
    (np.array([[0.5, 0.5]]), np.array([0.7, 0.7]), "summing to 1"),
])
def test_bad_arguments_are_refused_by_name(probs, prior, match):
    with pytest.raises(ValueError, match=match):
        em_prior(probs, prior)
