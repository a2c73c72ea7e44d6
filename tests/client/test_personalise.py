"""The site's own decision layer: anchored to the global one, free in its bias, deterministic."""

import numpy as np
import pytest

from fedrad.client.personalise import disagreement, head_probs, personalise_head


def data(n=400, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 3))
    return f, (f[:, 0] > shift).astype(int)


def test_a_strong_anchor_keeps_the_weights_and_moves_the_threshold():
    f, y = data(shift=-1.0)  # the site calls malignant from x0 > -1; the global head says x0 > 0
    weight, bias = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]]), np.zeros(2)
    w, b = personalise_head(f, y, weight, bias, steps=50, l2=100.0)
    assert np.abs(w - weight).max() < 0.1
    threshold = -(b[1] - b[0]) / (w[1, 0] - w[0, 0])
    assert threshold == pytest.approx(-1.0, abs=0.2)
    again = personalise_head(f, y, weight, bias, steps=50, l2=100.0)
    assert np.array_equal(again[0], w) and np.array_equal(again[1], b)


def test_zero_steps_returns_the_global_head_and_bad_input_is_refused():
    f, y = data()
    weight, bias = np.ones((2, 3)), np.zeros(2)
    w, b = personalise_head(f, y, weight, bias, steps=0, l2=1.0)
    assert np.allclose(w, weight) and np.allclose(b, bias)
    with pytest.raises(ValueError, match="both classes"):
        personalise_head(f, np.zeros(len(y), int), weight, bias, steps=5, l2=1.0)
    with pytest.raises(ValueError, match="do not fit together"):
        personalise_head(f[:, :2], y, weight, bias, steps=5, l2=1.0)


def test_head_probs_and_disagreement():
    p = head_probs(np.array([[1.0], [-1.0]]), np.array([[0.0], [2.0]]), np.zeros(2))
    assert np.allclose(p.sum(axis=1), 1.0) and p[0, 1] > 0.5 > p[1, 1]
    assert disagreement(p, p[:, ::-1]) == 1.0 and disagreement(p, p) == 0.0
    assert np.isnan(disagreement(np.zeros((0, 2)), np.zeros((0, 2))))
