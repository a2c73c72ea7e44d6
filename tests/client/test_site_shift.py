"""A site's label-shift correction on posteriors with a known answer, and every degenerate case."""

import numpy as np
import pytest
from scipy.special import log_softmax

import fedrad.client.site_shift as site_shift
from fedrad.client.folds import two_folds
from fedrad.client.site_shift import MIN_UNLABELLED, correct_site, personalise_site
from fedrad.common.config import RunConfig
from fedrad.common.labelshift import PriorEstimate
from fedrad.common.shift_flags import ShiftFlag, describe

REF = np.array([0.5, 0.5])  # the training prior


def site_images(n: int, prior_pos: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """log p_train(y|x) of an over-confident, biased model (logit 4x + 0.5; Bayes: 2x) and labels at `prior_pos`."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior_pos).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    return log_softmax(np.stack([np.zeros(n), 4 * x + 0.5], axis=1), axis=1), y


def folds_of(y: np.ndarray) -> np.ndarray:
    return two_folds([str(i) for i in range(len(y))], y, seed=0)


def test_a_shifted_site_estimates_its_prior_and_halves_its_calibration_error():
    g_test, y_test = site_images(800, 0.8, seed=0)
    g_unl, y_unl = site_images(3000, 0.8, seed=1)
    fix = correct_site(g_test, y_test, folds_of(y_test), g_unl, REF, np.array([.2, .8]))
    out, corrected, flags, calibrate = fix.metrics, fix.corrected, fix.flags, fix.calibrate
    assert flags == ShiftFlag.NONE
    assert abs(out["prior-em"] - y_unl.mean()) < 0.03 and abs(out["prior-bbse"] - y_unl.mean()) < 0.05
    assert out["prior-site"] == out["prior-em"]
    assert 1.5 < calibrate.temperature < 2.5  # softens the over-confident model: 4x / T = 2x at T = 2
    assert out["ece-corrected"] < 0.5 * out["ece-uncorrected"]
    assert out["brier-corrected"] < out["brier-uncorrected"]
    assert np.allclose(corrected.sum(axis=1), 1.0) and np.allclose(fix.reference.sum(axis=1), 1.0)


def test_without_unlabelled_images_the_labelled_prior_corrects():
    g_test, y_test = site_images(800, 0.8, seed=2)
    g_unl, _ = site_images(MIN_UNLABELLED - 1, 0.8, seed=3)
    fix = correct_site(g_test, y_test, folds_of(y_test), g_unl, REF, np.array([0.2, 0.8]))
    out, flags = fix.metrics, fix.flags
    assert flags == ShiftFlag.FEW_UNLABELLED and "prior-em" not in out
    assert out["prior-site"] == pytest.approx(0.8)
    assert out["ece-corrected"] < 0.5 * out["ece-uncorrected"]
    assert describe(flags, "site-x") == []  # informational, not a warning
    assert "labelled counts" in describe(flags, "site-x", include_info=True)[0]


def assert_uncorrected(out: dict, corrected: np.ndarray, g_test: np.ndarray) -> None:
    assert np.array_equal(corrected, np.exp(g_test))
    assert out["ece-corrected"] == out["ece-uncorrected"] and "prior-site" not in out
    assert all(np.isfinite(v) or k.startswith("balanced") for k, v in out.items())


def test_a_class_absent_from_the_labels_falls_back_to_no_correction():
    g_test, _ = site_images(100, 0.5, seed=4)
    y_test = np.zeros(100, dtype=int)
    g_unl, _ = site_images(200, 0.5, seed=5)
    fix = correct_site(g_test, y_test, folds_of(y_test), g_unl, REF, np.array([.5, .5]))
    out, corrected, flags = fix.metrics, fix.corrected, fix.flags
    assert flags & ShiftFlag.CLASS_ABSENT and fix.calibrate is None
    assert_uncorrected(out, corrected, g_test)
    assert describe(flags, "site-q")[0].startswith("site site-q: a class is absent")


def test_too_few_labelled_images_to_calibrate_fall_back():
    g_test, y_test = site_images(12, 0.5, seed=6)
    g_unl, _ = site_images(200, 0.5, seed=7)
    fix = correct_site(g_test, y_test, folds_of(y_test), g_unl, REF, np.array([.5, .5]))
    out, corrected, flags = fix.metrics, fix.corrected, fix.flags
    assert flags & ShiftFlag.FEW_CALIBRATION
    assert_uncorrected(out, corrected, g_test)
    assert "No label-shift correction" in describe(flags, "site-q")[0]


def test_em_that_does_not_converge_falls_back(monkeypatch):
    monkeypatch.setattr(site_shift, "em_prior", lambda *a, **k: PriorEstimate(None, 10_000, "EM did not converge"))
    g_test, y_test = site_images(400, 0.7, seed=8)
    g_unl, _ = site_images(400, 0.7, seed=9)
    fix = correct_site(g_test, y_test, folds_of(y_test), g_unl, REF, np.array([.3, .7]))
    out, corrected, flags = fix.metrics, fix.corrected, fix.flags
    assert flags & ShiftFlag.EM_FAILED and "prior-em" not in out
    assert_uncorrected(out, corrected, g_test)
    assert any("EM did not converge" in w for w in describe(flags, "site-q"))


def concept_site(n: int, threshold: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-d features; the global head reads x0 (log-odds 3·x0); labels: 1 if x0 + noise > threshold."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 2))
    return f, (f[:, 0] + rng.normal(0, 0.3, n) > threshold).astype(int)


@pytest.mark.parametrize("threshold, flagged", [(0.0, False), (-0.8, True)])
def test_personalised_head_disagrees_only_where_the_labelling_rule_differs(threshold, flagged):
    weight, bias = np.array([[0.0, 0.0], [3.0, 0.0]]), np.zeros(2)
    f_lab, y_lab = concept_site(300, threshold, seed=10)
    f_test, y_test = concept_site(300, threshold, seed=11)
    global_posteriors = np.exp(log_softmax(f_test @ weight.T + bias, axis=1))
    out, head = personalise_site(f_lab, y_lab, f_test, y_test, folds_of(y_test), global_posteriors, weight, bias,
                                 RunConfig())
    assert head is not None and head[0].shape == weight.shape
    assert bool(out["concept-shift"]) is flagged
    assert (out["disagreement"] > 0.15) if flagged else (out["disagreement"] < 0.05)
    assert 0.5 < out["auc-personalised"] <= 1.0


def test_personalisation_with_one_class_is_skipped():
    f, _ = concept_site(50, 0.0, seed=12)
    y = np.zeros(50, dtype=int)
    out, head = personalise_site(f, y, f, y, folds_of(y), np.full((50, 2), 0.5), np.zeros((2, 2)), np.zeros(2),
                                 RunConfig())
    assert head is None and out == {}


def test_folds_are_stratified_balanced_and_stable():
    y = np.array([0] * 7 + [1] * 4)
    keys = [f"k{i}" for i in range(11)]
    folds = two_folds(keys, y, seed=3)
    assert np.bincount(folds[y == 0]).tolist() in ([4, 3], [3, 4]) and np.bincount(folds[y == 1]).tolist() == [2, 2]
    order = np.random.default_rng(0).permutation(11)  # the fold of an image follows its key, not its row
    again = two_folds([keys[i] for i in order], y[order], seed=3)
    assert np.array_equal(again, folds[order])


def band_site(n: int, prior_pos: float, threshold: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like the generator: latent class, score x ~ N(±1, 1); labels flipped to 1 for x in (threshold, 0]."""
    rng = np.random.default_rng(seed)
    latent = (rng.random(n) < prior_pos).astype(int)
    x = rng.normal(np.where(latent == 1, 1.0, -1.0), 1.0)
    y = np.where((x > threshold) & (x <= 0), 1, latent)
    features = np.stack([x, rng.normal(size=n)], axis=1)
    return features, log_softmax(np.stack([np.zeros(n), 2 * x], axis=1), axis=1), y  # exact posterior at prior .5


@pytest.mark.parametrize("prior_pos, threshold, flagged", [(0.8, 0.0, False), (0.35, -1.2, True)])
def test_concept_shift_is_flagged_and_label_shift_is_not(prior_pos, threshold, flagged):
    f_lab, _, y_lab = band_site(400, prior_pos, threshold, seed=20)
    f_test, g_test, y_test = band_site(400, prior_pos, threshold, seed=21)
    _, g_unl, _ = band_site(400, prior_pos, threshold, seed=22)
    folds = folds_of(y_test)
    fix = correct_site(g_test, y_test, folds, g_unl, REF, np.bincount(y_lab) / len(y_lab))
    out, _ = personalise_site(f_lab, y_lab, f_test, y_test, folds, fix.reference, np.array([[0.0, 0.0], [2.0, 0.0]]),
                              np.zeros(2), RunConfig())
    assert bool(out["concept-shift"]) is flagged, out["disagreement"]
