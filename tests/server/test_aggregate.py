"""The coordinator's arithmetic, exactly."""

import numpy as np
import pytest

from fedrad.server.aggregate import (
    UpdateRejected,
    norm_outliers,
    spec_of,
    update_distance,
    validate_update,
    weighted_average,
)


def test_weighted_average_is_sample_weighted():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.0], np.float32)}
    b = {"w": np.array([4.0, 8.0], np.float32), "b": np.array([3.0], np.float32)}
    out = weighted_average([(a, 10), (b, 30)])
    np.testing.assert_allclose(out["w"], [(10 * 1 + 30 * 4) / 40, (10 * 2 + 30 * 8) / 40])
    np.testing.assert_allclose(out["b"], [90 / 40])
    assert out["w"].dtype == np.float32
    assert list(out) == ["w", "b"]


def test_weighted_average_of_one_is_identity():
    a = {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(weighted_average([(a, 7)])["w"], a["w"])


EXPECTED = spec_of({"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)})


def good():
    return {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}


@pytest.mark.parametrize("mutate, match", [
    (lambda u: u.update(w=np.full((2, 2), np.nan, np.float32)), "NaN or Inf"),
    (lambda u: u.update(b=np.array([np.inf, 0], np.float32)), "NaN or Inf"),
    (lambda u: u.update(w=np.ones((3, 2), np.float32)), "shape"),
    (lambda u: u.update(w=np.ones((2, 2), np.float64)), "dtype"),
    (lambda u: u.update(extra=np.ones(2, np.float32)), "unexpected"),
    (lambda u: u.pop("b"), "missing"),
])
def test_malformed_updates_are_rejected_naming_the_site(mutate, match):
    update = good()
    mutate(update)
    with pytest.raises(UpdateRejected, match=f"site hospital-x: .*{match}"):
        validate_update("hospital-x", update, 10, EXPECTED)


@pytest.mark.parametrize("n", [0, -3, "10", None, True])
def test_bad_example_counts_are_rejected(n):
    with pytest.raises(UpdateRejected, match="num-examples"):
        validate_update("s", good(), n, EXPECTED)


def test_good_update_passes():
    validate_update("s", good(), 5, EXPECTED)


def test_norm_outliers_judge_each_update_against_the_others_median():
    ref = {"w": np.zeros(4, np.float32)}
    assert update_distance({"w": np.array([3, 4, 0, 0], np.float32)}, ref) == pytest.approx(5.0)
    assert norm_outliers([1.0, 1.2, 0.9, 1000.0], 10.0) == [None, None, None, 1.0]
    assert norm_outliers([1.0, 1000.0], 10.0) == [None, 1.0]  # works with two sites
    assert norm_outliers([1.0, 50.0], 0.0) == [None, None]  # factor 0 = off
    assert norm_outliers([5.0], 10.0) == [None]  # nobody to compare with
    assert norm_outliers([0.0, 0.0, 3.0], 10.0) == [None, None, None]  # a zero yardstick judges nobody


def test_capped_weights_bound_each_weight_by_the_others_median():
    from fedrad.server.aggregate import capped_weights

    assert capped_weights([100, 100, 1e12], 10) == [100, 100, 1000]
    assert capped_weights([100, 1e12], 10) == [100, 1000]  # two sites: the other one is the yardstick
    assert capped_weights([5, 7, 9], 10) == [5, 7, 9]
    assert capped_weights([100, 1e12], 0) == [100, 1e12]  # off
