"""BCTS on logits with a known miscalibration: the fit recovers the temperature and the bias."""

import numpy as np
import pytest

from fedrad.client.calibration import BCTS, fit_bcts
from fedrad.common.labelshift import em_prior
from fedrad.common.metrics import brier_score, expected_calibration_error


def miscalibrated(n: int, prior_pos: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels from true log-odds ℓ = 2x + logit(prior); the model reports 2ℓ + 1 (over-confident, biased)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior_pos).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    true = 2 * x + np.log(prior_pos / (1 - prior_pos))
    z = np.stack([np.zeros(n), 2 * true + 1], axis=1)
    return z, y, true


def test_bcts_recovers_temperature_and_bias():
    z, y, _ = miscalibrated(40_000, 0.5, seed=0)
    cal = fit_bcts(z, y)
    # z/T + b = ℓ needs T = 2 and b = -1/2
    assert cal.temperature == pytest.approx(2.0, rel=0.05)
    assert cal.bias[0] == 0.0 and cal.bias[1] == pytest.approx(-0.5, abs=0.05)


def test_bcts_makes_posteriors_calibrated():
    z, y, _ = miscalibrated(4_000, 0.4, seed=1)
    zt, yt, _ = miscalibrated(4_000, 0.4, seed=2)
    cal = fit_bcts(z, y)
    raw = 1 / (1 + np.exp(-zt[:, 1]))
    fixed = cal(zt)[:, 1]
    assert expected_calibration_error(yt, fixed) < 0.5 * expected_calibration_error(yt, raw)
    assert brier_score(yt, fixed) < brier_score(yt, raw)


def test_bcts_with_a_prior_offset_stays_calibrated_under_the_reference_prior():
    # held-out images at prior 0.8; the posteriors should describe prior 0.5
    z, y, _ = miscalibrated(40_000, 0.8, seed=3)
    z = z - np.array([0.0, np.log(4.0) * 2])  # the model's logits hold no prior: 2(ℓ - logit 0.8) + 1
    cal = fit_bcts(z, y, prior_fit=np.array([0.2, 0.8]), prior_ref=np.array([0.5, 0.5]))
    assert cal.temperature == pytest.approx(2.0, rel=0.05)
    assert cal.bias[1] == pytest.approx(-0.5, abs=0.07)
    # EM on images at prior 0.3, from these calibrated posteriors with source prior 0.5, finds 0.3
    zt, yt, _ = miscalibrated(20_000, 0.3, seed=4)
    zt = zt - np.array([0.0, 2 * np.log(0.3 / 0.7)])
    est = em_prior(cal(zt), np.array([0.5, 0.5]))
    assert abs(est.prior[1] - yt.mean()) < 0.02


def test_bcts_on_a_few_separable_images_stays_near_the_identity():
    # 16 perfectly separated images: maximum likelihood would send T to 0; the prior keeps the map sane
    z = np.stack([np.zeros(16), np.r_[np.linspace(-6, -1, 8), np.linspace(1, 6, 8)]], axis=1)
    cal = fit_bcts(z, np.r_[np.zeros(8, int), np.ones(8, int)])
    assert 0.5 < cal.temperature < 1.5 and abs(cal.bias[1]) < 1.0
    assert np.all(np.isfinite(cal(z)))


def test_bcts_refuses_a_missing_class_by_count():
    with pytest.raises(ValueError, match=r"at least 2 held-out images of every class; got class counts \[3, 1\]"):
        fit_bcts(np.zeros((4, 2)), np.array([0, 0, 0, 1]))


def test_identity_map_changes_nothing():
    z = np.array([[0.1, 1.2], [2.0, -1.0]])
    e = np.exp(z)
    assert BCTS.identity(2)(z) == pytest.approx(e / e.sum(axis=1, keepdims=True))


def test_brier_score():
    assert brier_score(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0
    assert brier_score(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.25)
    assert np.isnan(brier_score(np.array([]), np.array([])))


def test_temperature_only_keeps_the_bias_at_zero():
    z, y, _ = miscalibrated(20_000, 0.5, seed=5)
    cal = fit_bcts(z, y, bias=False)
    assert np.all(cal.bias == 0.0) and 1.5 < cal.temperature < 2.5


def test_class_balanced_fit_equals_the_fit_on_a_balanced_copy():
    # weights n / (K n_y) on a 0.9-prevalence set = the unweighted fit on the same images with each
    # negative repeated 9 times (prior 0.5); only the MAP prior's per-image strength differs (1/n)
    z, y, _ = miscalibrated(4_000, 0.9, seed=3)
    neg, pos = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    reps = round(len(pos) / len(neg))
    idx = np.concatenate([pos[: reps * len(neg)], np.repeat(neg, reps)])
    keep = np.concatenate([pos[: reps * len(neg)], neg])
    ref = np.array([0.4, 0.6])
    counts = np.bincount(y[keep], minlength=2) / len(keep)
    weighted = fit_bcts(z[keep], y[keep], prior_fit=counts, prior_ref=ref, class_balanced=True)
    copied = fit_bcts(z[idx], y[idx], prior_fit=np.array([0.5, 0.5]), prior_ref=ref)
    plain = fit_bcts(z[keep], y[keep], prior_fit=counts, prior_ref=ref)
    assert weighted.temperature == pytest.approx(copied.temperature, rel=0.01)
    assert weighted.bias[1] == pytest.approx(copied.bias[1], abs=0.02)
    # and it is a different fit from the unweighted one on this model (2 levels of over-confidence)
    assert plain.temperature != pytest.approx(weighted.temperature, rel=1e-6)


def test_class_balanced_fit_recovers_the_map_on_imbalanced_images():
    z, y, _ = miscalibrated(40_000, 0.9, seed=4)
    pf = np.bincount(y, minlength=2) / len(y)
    cal = fit_bcts(z, y, prior_fit=pf, prior_ref=pf, class_balanced=True)
    # the model is 2ℓ + 1 where ℓ already holds the 0.9 prior: T = 2, b = -1/2 under π_ref = π_fit
    assert cal.temperature == pytest.approx(2.0, rel=0.05)
    assert cal.bias[1] == pytest.approx(-0.5, abs=0.1)
