"""Shift score maths: moments pool exactly, the Fréchet distance on moments equals a direct computation."""

import numpy as np
import pytest
from scipy import linalg

from fedrad.common.feature_shift import Moments, frechet_distance, moments, pool_moments, projection, shift_scores


def direct_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula on raw samples, with scipy's general matrix square root."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False, bias=True), np.cov(y, rowvar=False, bias=True)
    cross = linalg.sqrtm(s_x @ s_y).real
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(s_x + s_y - 2 * cross))


def test_frechet_distance_on_moments_matches_the_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(1.0, 2.0, size=(300, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(moments(a), moments(b)) == pytest.approx(direct_frechet(a, b), rel=1e-8)
    assert frechet_distance(moments(a), moments(a)) == pytest.approx(0.0, abs=1e-9)
    # a pure shift of the mean: FD = |delta|^2
    assert frechet_distance(moments(a), moments(a + 3.0)) == pytest.approx(6 * 9.0, rel=1e-9)


def test_pooled_moments_equal_the_moments_of_the_concatenated_features():
    rng = np.random.default_rng(1)
    parts = [rng.normal(m, s, size=(n, 4)) for m, s, n in [(0, 1, 50), (2, 0.5, 120), (-1, 3, 9)]]
    pooled = pool_moments([moments(p) for p in parts])
    direct = moments(np.concatenate(parts))
    assert pooled.n == direct.n == 179
    np.testing.assert_allclose(pooled.mean, direct.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pooled.cov, direct.cov, rtol=1e-10, atol=1e-12)


def test_the_shifted_site_scores_highest_and_identical_sites_score_alike():
    rng = np.random.default_rng(2)
    sites = {name: moments(rng.normal(size=(200, 5))) for name in ("a", "b", "c")}
    sites["d"] = moments(rng.normal(1.5, 1.0, size=(200, 5)))
    scores = shift_scores(sites)
    assert max(scores, key=scores.get) == "d"
    assert max(scores["a"], scores["b"], scores["c"]) < scores["d"] / 3


def test_projection_is_fixed_by_its_seed_and_has_orthonormal_rows():
    p = projection(1280, 16, seed=3)
    assert p.shape == (16, 1280) and p.dtype == np.float32
    np.testing.assert_allclose(p @ p.T, np.eye(16), atol=1e-5)
    np.testing.assert_array_equal(p, projection(1280, 16, seed=3))
    assert not np.allclose(p, projection(1280, 16, seed=4))
    with pytest.raises(ValueError, match="The 'dim' parameter of projection must be in"):
        projection(8, 16, seed=0)


def test_moments_refuse_bad_shapes():
    with pytest.raises(ValueError, match="mean \\(k,\\) and cov \\(k, k\\)"):
        Moments(3, np.zeros(4), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least one"):
        pool_moments([])
    with pytest.raises(ValueError, match=r"\(n, k\) array"):
        moments(np.zeros(5))
