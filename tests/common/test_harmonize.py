"""Histogram pooling, quantiles and matching maps: exact arithmetic, clear warnings, pure transforms."""

import warnings

import numpy as np
import pytest

from fedrad.common.harmonize import (
    BIN_HU,
    HU_MAX,
    HU_MIN,
    MIN_PIXELS,
    N_BINS,
    HarmonizationWarning,
    IntensityMatch,
    bin_edges,
    histogram_problem,
    intensity_histogram,
    pool_histograms,
    quantiles,
    summary,
)


def lung_ct(rng, n, offset=0.0, noise=30.0, tissue=0.1):
    """HU like a lesion field of view: aerated lung around -850 and a soft-tissue share around 40."""
    k = int(tissue * n)
    return np.concatenate([rng.normal(-850 + offset, noise, n - k), rng.normal(40 + offset, noise, k)])


def test_bins_are_fixed_and_cover_the_ct_range():
    edges = bin_edges()
    assert edges.shape == (N_BINS + 1,) and edges[0] == HU_MIN and edges[-1] == HU_MAX
    np.testing.assert_allclose(np.diff(edges), BIN_HU)


def test_histogram_counts_every_finite_value_once_and_clips_out_of_range():
    values = np.array([-5000.0, -1024.0, -1023.0, 0.0, 1.9, 3071.9, 3072.0, 9999.0, np.nan])
    counts = intensity_histogram(values)
    assert counts.dtype == np.int64 and counts.sum() == 8  # NaN not counted
    assert counts[0] == 3 and counts[-1] == 3  # below the range -> first bin, at/above the top -> last bin
    assert counts[int((0.0 - HU_MIN) / BIN_HU)] == 2  # 0.0 and 1.9 share the [0, 2) bin


def test_pooling_is_exact_pooled_counts_equal_the_counts_of_the_concatenated_data():
    rng = np.random.default_rng(0)
    sites = [lung_ct(rng, 5000, offset=o, noise=n) for o, n in [(0, 15), (40, 25), (-30, 10), (20, 35)]]
    pooled = pool_histograms([intensity_histogram(v) for v in sites])
    np.testing.assert_array_equal(pooled, intensity_histogram(np.concatenate(sites)))
    assert pooled.dtype == np.int64


@pytest.mark.parametrize("bad, match", [
    (np.zeros(10), "2048 fixed bins"),
    (-np.ones(N_BINS), "non-negative whole counts"),
    (np.full(N_BINS, 0.5), "non-negative whole counts"),
])
def test_pooling_refuses_what_is_not_a_histogram_of_the_fixed_bins(bad, match):
    with pytest.raises(ValueError, match=match):
        pool_histograms([np.zeros(N_BINS, np.int64), bad])
    with pytest.raises(ValueError, match="at least one"):
        pool_histograms([])


def test_quantiles_of_a_histogram_are_those_of_the_data_within_a_bin():
    rng = np.random.default_rng(1)
    values = lung_ct(rng, 200_000)
    probs = (np.arange(99) + 0.5) / 100  # not 0.9 exactly: there the CDF is flat and any gap value is a quantile
    np.testing.assert_allclose(quantiles(intensity_histogram(values), probs), np.quantile(values, probs),
                               atol=BIN_HU)


@pytest.mark.parametrize("method, split_hu", [("quantile", None), ("landmarks", None), ("quantile", -400.0),
                                              ("landmarks", -400.0)])
def test_matching_maps_a_sites_quantiles_onto_the_references_within_a_bin(method, split_hu):
    rng = np.random.default_rng(2)
    site = intensity_histogram(lung_ct(rng, 100_000, offset=40, noise=45, tissue=0.12))
    reference = pool_histograms([site, intensity_histogram(lung_ct(rng, 300_000, offset=0, noise=20))])
    match = IntensityMatch.fit(site, reference, method=method, split_hu=split_hu)
    nyul = np.array([1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]) / 100.0
    probs = np.linspace(0.001, 0.999, 999) if method == "quantile" else nyul  # every quantile / the landmarks
    if split_hu is None:
        np.testing.assert_allclose(match(quantiles(site, probs)), quantiles(reference, probs), atol=BIN_HU)
        return
    # with a split each side is matched on its own: the site's p-quantile within a side goes to the
    # reference's p-quantile within the same side
    k = int((split_hu - HU_MIN) / BIN_HU)
    for side in (slice(0, k), slice(k, N_BINS)):
        site_side, ref_side = np.zeros_like(site), np.zeros_like(reference)
        site_side[side], ref_side[side] = site[side], reference[side]
        np.testing.assert_allclose(match(quantiles(site_side, probs)), quantiles(ref_side, probs), atol=BIN_HU)


def test_matching_removes_a_calibration_offset_and_a_matched_site_is_left_alone():
    rng = np.random.default_rng(3)
    base = lung_ct(rng, 200_000)
    reference = intensity_histogram(base)
    shifted = IntensityMatch.fit(intensity_histogram(base + 60.0), reference, method="quantile", split_hu=-400)
    np.testing.assert_allclose(shifted(np.array([-790.0, 100.0])), [-850.0, 40.0], atol=2 * BIN_HU)
    same = IntensityMatch.fit(reference, reference, method="landmarks")
    x = np.linspace(-1000, 500, 31)
    np.testing.assert_allclose(same(x), x, atol=1e-6)


@pytest.mark.parametrize("split_hu", [None, -400.0])
def test_median_standardisation_moves_the_median_and_keeps_contrast(split_hu):
    rng = np.random.default_rng(9)
    site = intensity_histogram(lung_ct(rng, 100_000, offset=120, noise=10))  # a smooth site, 120 HU too high
    reference = intensity_histogram(lung_ct(rng, 300_000, offset=0, noise=40))  # noisier, wider
    match = IntensityMatch.fit(site, reference, method="median", split_hu=split_hu)
    k = N_BINS if split_hu is None else int((split_hu - HU_MIN) / BIN_HU)
    site_lung, ref_lung = site.copy(), reference.copy()
    site_lung[k:], ref_lung[k:] = 0, 0  # with a split, the median of each side is its landmark
    assert match(quantiles(site_lung, [0.5]))[0] == pytest.approx(quantiles(ref_lung, [0.5])[0], abs=BIN_HU)
    slope = (match(np.array([100.0])) - match(np.array([0.0])))[0] / 100.0
    assert slope == pytest.approx(1.0, abs=0.05)  # texture and noise amplitude kept, unlike full matching
    full = IntensityMatch.fit(site, reference, method="quantile", split_hu=split_hu)
    assert (full(np.array([200.0])) - full(np.array([140.0])))[0] / 60.0 > 2.0  # matching spreads stretches


def test_the_transform_is_pure_monotone_and_keeps_shape_and_dtype():
    rng = np.random.default_rng(4)
    match = IntensityMatch.fit(intensity_histogram(lung_ct(rng, 50_000, offset=30, noise=40)),
                               intensity_histogram(lung_ct(rng, 50_000)), method="quantile", split_hu=-400)
    crop = rng.normal(-500, 400, size=(24, 24)).astype(np.float32)
    before = crop.copy()
    out = match(crop)
    np.testing.assert_array_equal(crop, before)  # input untouched
    assert out.shape == crop.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, match(crop))  # deterministic
    x = np.linspace(-2000, 4000, 5001)
    assert np.all(np.diff(match(x)) >= 0)  # monotone, extrapolation included
    assert "digest=" in repr(match) and repr(match) == repr(IntensityMatch(match.source_hu, match.target_hu,
                                                                          method=match.method))


def test_a_site_with_too_few_pixels_gets_a_clear_warning_and_the_identity():
    rng = np.random.default_rng(5)
    reference = intensity_histogram(lung_ct(rng, 100_000))
    few = intensity_histogram(lung_ct(rng, 50))
    assert "only 50 pixels" in histogram_problem(few)
    with pytest.warns(HarmonizationWarning, match=r"site tiny: only 50 pixels .* left unchanged"):
        match = IntensityMatch.fit(few, reference, method="quantile", site="tiny")
    x = np.array([-900.0, 0.0, 100.0])
    np.testing.assert_array_equal(match(x), x.astype(np.float32))


def test_a_constant_image_gets_a_clear_warning_not_a_crash():
    constant = intensity_histogram(np.full((100, 100), -1024.0))
    reference = intensity_histogram(lung_ct(np.random.default_rng(6), 100_000))
    assert "constant image" in histogram_problem(constant)
    with pytest.warns(HarmonizationWarning, match="site blank: all its intensities fall in one 2 HU bin"):
        match = IntensityMatch.fit(constant, reference, method="landmarks", site="blank")
    assert match.method == "identity"
    with pytest.warns(HarmonizationWarning, match="the reference histogram has only 0 pixels"):
        IntensityMatch.fit(reference, np.zeros(N_BINS, np.int64), site="x")


def test_a_thin_side_of_the_split_is_left_unchanged_with_a_warning():
    rng = np.random.default_rng(7)
    lung_only = intensity_histogram(np.concatenate([rng.normal(-850, 30, 50_000), rng.normal(40, 10, 20)]))
    reference = intensity_histogram(lung_ct(rng, 100_000))
    with pytest.warns(HarmonizationWarning, match=r"site s: too few pixels between -400 and 3072 HU"):
        match = IntensityMatch.fit(lung_only, reference, method="quantile", split_hu=-400, site="s")
    np.testing.assert_allclose(match(np.array([40.0, 500.0])), [40.0, 500.0], atol=1e-4)


def test_summary_and_bad_method():
    counts = intensity_histogram(lung_ct(np.random.default_rng(8), MIN_PIXELS))
    s = summary(counts)
    assert s["pixels"] == MIN_PIXELS and s["p5_hu"] < s["p50_hu"] < s["p95_hu"]
    with pytest.raises(ValueError, match="The 'method' parameter .* Got 'histeq' instead"):
        IntensityMatch.fit(counts, counts, method="histeq")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IntensityMatch.fit(counts, counts, method="quantile")  # a usable site raises no warning
