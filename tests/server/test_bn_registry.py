"""BN registry: pooled statistics equal those of the concatenated data; latest report per site wins."""

import numpy as np
import pytest

from fedrad.server.bn_registry import BNRegistry, pool_moments


def site_data(seed, n, shift):
    rng = np.random.default_rng(seed)
    return rng.normal(shift, 1.0 + seed, size=(n, 4))  # n images' per-channel values, 4 channels


def test_pooled_mean_and_variance_equal_those_of_the_concatenated_data():
    groups = [site_data(0, 30, 0.0), site_data(1, 7, 5.0), site_data(2, 100, -2.0)]
    mean, var = pool_moments([g.mean(0) for g in groups], [g.var(0) for g in groups], [len(g) for g in groups])
    everything = np.concatenate(groups)
    np.testing.assert_allclose(mean, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, everything.var(0), rtol=1e-12)
    # the average of variances misses the spread between sites' means: it is strictly smaller here
    naive = np.average([g.var(0) for g in groups], axis=0, weights=[len(g) for g in groups])
    assert (naive < var - 1.0).all()


def test_equal_sites_pool_to_themselves():
    m, v = np.array([1.0, 2.0]), np.array([0.5, 3.0])
    mean, var = pool_moments([m, m], [v, v], [3, 9])
    np.testing.assert_allclose(mean, m)
    np.testing.assert_allclose(var, v)


@pytest.mark.parametrize("counts, match", [([1, 0], "positive count"), ([1], "as many means")])
def test_pool_moments_refuses_bad_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        pool_moments([np.zeros(2), np.zeros(2)], [np.ones(2), np.ones(2)], counts)


def stats(mean, var):
    return {"blk._bn0.running_mean": np.asarray(mean, np.float32), "blk._bn0.running_var": np.asarray(var, np.float32),
            "_bn1.running_mean": np.zeros(3, np.float32), "_bn1.running_var": np.ones(3, np.float32)}


def test_registry_keeps_the_latest_round_per_site_and_pools_by_count():
    reg = BNRegistry()
    reg.update("a", 1, stats([0.0, 0.0], [1.0, 1.0]), 10)
    reg.update("b", 1, stats([2.0, 4.0], [1.0, 2.0]), 30)
    reg.update("a", 3, stats([1.0, 1.0], [1.0, 1.0]), 10)
    reg.update("a", 2, stats([9.0, 9.0], [9.0, 9.0]), 10)  # late reply from an older round: ignored
    assert [(e["site"], e["round"], e["count"], e["layers"]) for e in reg.summary()] == [("a", 3, 10, 2),
                                                                                         ("b", 1, 30, 2)]
    pooled = reg.pooled()
    assert list(pooled) == list(stats(0, 0))
    np.testing.assert_allclose(pooled["blk._bn0.running_mean"], [0.25 * 1 + 0.75 * 2, 0.25 * 1 + 0.75 * 4])
    expected_var = [0.25 * (1 + (1 - 1.75) ** 2) + 0.75 * (1 + (2 - 1.75) ** 2),
                    0.25 * (1 + (1 - 3.25) ** 2) + 0.75 * (2 + (4 - 3.25) ** 2)]
    np.testing.assert_allclose(pooled["blk._bn0.running_var"], expected_var, rtol=1e-6)
    assert pooled["blk._bn0.running_var"].dtype == np.float32
    np.testing.assert_allclose(reg.pooled(["b"])["blk._bn0.running_mean"], [2.0, 4.0])  # leave-one-out pooling
    # the registry holds copies: a caller changing its arrays later changes nothing here
    mine = stats([5.0, 5.0], [1.0, 1.0])
    reg.update("c", 1, mine, 5)
    mine["blk._bn0.running_mean"][:] = 100
    assert reg.sites["c"].stats["blk._bn0.running_mean"][0] == 5.0


def test_shift_score_is_zero_for_identical_sites_and_grows_with_shift():
    reg = BNRegistry()
    for name, shift in (("a", 0.0), ("b", 0.0), ("c", 3.0)):
        reg.update(name, 1, stats([shift, shift], [1.0, 1.0]), 10)
    scores = reg.shift_scores()
    assert scores["a"] == pytest.approx(scores["b"])
    assert scores["c"] > scores["a"] > 0
    same = BNRegistry()
    same.update("a", 1, stats([1.0, 1.0], [2.0, 2.0]), 4)
    same.update("b", 1, stats([1.0, 1.0], [2.0, 2.0]), 8)
    assert same.shift_scores() == pytest.approx({"a": 0.0, "b": 0.0}, abs=1e-7)


@pytest.mark.parametrize("bad, count, match", [
    ({"x.running_mean": np.zeros(2)}, 5, "lacks its running_var"),
    ({"x.running_mean": np.zeros(2), "x.running_var": -np.ones(2)}, 5, "negative running_var"),
    ({"x.weight": np.zeros(2)}, 5, "must end in .running_mean"),
    (stats([0, 0], [1, 1]), 0, "positive integer"),
    (stats([0, 0], [1, 1]), 2.5, "positive integer"),
])
def test_registry_refuses_bad_reports_naming_the_site(bad, count, match):
    with pytest.raises(ValueError, match=f"site s1: .*{match}|{match}"):
        BNRegistry().update("s1", 1, bad, count)
