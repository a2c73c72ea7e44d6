import math

import numpy as np
import pytest

from common.metrics import classification_metrics, expected_calibration_error


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
