"""Differential privacy at the site: the update is clipped to dp-clip, then noised with std dp-noise x dp-clip."""

import math

import numpy as np
import pytest
import torch

from fedrad.client.dp_noise import clip_and_noise
from fedrad.common.dp import epsilon


def test_without_noise_a_large_update_is_clipped_to_the_norm_and_a_small_one_kept():
    received = {"a": torch.zeros(100), "b": torch.ones(3, 3)}
    trained = {"a": torch.full((100,), 0.5), "b": torch.ones(3, 3) + 2.0}
    out, norm = clip_and_noise(trained, received, clip=1.0, noise=0.0)
    assert norm == pytest.approx(math.sqrt(100 * 0.25 + 9 * 4.0))
    delta = torch.cat([(out[k] - received[k]).flatten() for k in received])
    assert float(delta.norm()) == pytest.approx(1.0, rel=1e-5)
    # direction kept: the clipped update is the update scaled down
    np.testing.assert_allclose((out["a"] - received["a"]).numpy(), 0.5 / norm, rtol=1e-5)
    small, _ = clip_and_noise({"a": torch.full((4,), 0.1)}, {"a": torch.zeros(4)}, clip=1.0, noise=0.0)
    np.testing.assert_allclose(small["a"].numpy(), 0.1, rtol=1e-6)


def test_the_noise_has_std_noise_times_clip_and_does_not_follow_any_seed():
    received = {"w": torch.zeros(200_000)}
    out, _ = clip_and_noise(received, received, clip=0.5, noise=2.0)
    assert float(out["w"].std()) == pytest.approx(1.0, rel=0.02) and abs(float(out["w"].mean())) < 0.01
    again, _ = clip_and_noise(received, received, clip=0.5, noise=2.0)
    assert not torch.equal(out["w"], again["w"])  # operating-system entropy, never the run's seed
    assert out["w"].dtype == torch.float32


def test_epsilon_falls_with_noise_grows_with_rounds_and_is_within_the_plain_rdp_bound():
    e = {s: epsilon(s, 5, 1e-5) for s in (0.5, 1.0, 2.0)}
    assert e[0.5] > e[1.0] > e[2.0] > 0
    assert epsilon(1.0, 10, 1e-5) > e[1.0]
    # composition of Gaussian mechanisms: RDP T*a/(2 s^2); the textbook conversion is an upper bound
    naive = min(5 * a / 2 + math.log(1e5) / (a - 1) for a in np.linspace(1.01, 100, 20_000))
    assert e[1.0] <= naive + 1e-9 and e[1.0] > 0.5 * naive
    assert epsilon(0.0, 5, 1e-5) == math.inf
