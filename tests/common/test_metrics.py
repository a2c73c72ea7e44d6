import math

import numpy as np
import pytest

from fedrad.common.metrics import classification_metrics, expected_calibration_error


def test_ece_of_a_perfectly_calibrated_predictor_is_small():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01


def test_ece_of_an_overconfident_predictor():
    # always 0.9 confident in class 1, right half the time: ECE = |0.5 - 0.9| = 0.4
    y = np.array([0, 1] * 50)
    assert expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.4)


def test_metrics_of_a_perfect_ranker():
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.6, 0.8]))
    assert m["auc"] == 1.0 and m["balanced-accuracy"] == 1.0


def test_one_class_gives_nan_auc_not_a_crash():
    m = classification_metrics(np.array([1, 1, 1]), np.array([0.2, 0.7, 0.9]))
    assert math.isnan(m["auc"]) and m["balanced-accuracy"] == pytest.approx(2 / 3)


def test_ece_floor_is_what_calibrated_posteriors_score_and_shrinks_with_more_images():
    from fedrad.common.metrics import ece_noise_floor

    assert ece_noise_floor(np.array([0.0, 1.0, 1.0, 0.0])) == 0.0  # certain and right: no noise to measure
    rng = np.random.default_rng(3)
    small, large = rng.beta(5, 1, 300), rng.beta(5, 1, 30_000)
    floor_small, floor_large = ece_noise_floor(small), ece_noise_floor(large, n_draws=20)
    assert 0.005 < floor_small < 0.08  # a few hundred calibrated images still score a visible ECE
    assert floor_large < floor_small / 5  # ~1/sqrt(n): 100x the images, ~10x less noise
    # Calibrated labels drawn once score near the floor; labels from a shifted prior score far above it.
    y_calibrated = rng.random(300) < small
    y_shifted = rng.random(300) < small ** 3
    assert expected_calibration_error(y_calibrated, small) < 3 * floor_small
    assert expected_calibration_error(y_shifted, small) > 3 * floor_small
    assert np.isnan(ece_noise_floor(np.array([])))
