"""The site model's pieces without a federation: corrections, run-id checks, patient bootstrap, folder reading."""

import numpy as np
import pytest
import torch
from scipy.special import softmax

from fedrad.client.calibration import BCTS
from fedrad.client.local_state import LocalStateStore
from fedrad.client.predict import read_site_folder, score_folder
from fedrad.client.site_evaluation import evaluate_scores, patient_bootstrap_auc
from fedrad.client.site_model import Posteriors, RunModel, SiteModelError, site_local_state
from fedrad.common.labelshift import correct_posteriors
from fedrad.common.preprocess import Preprocessor
from tests.helpers import write_dicom


def test_posteriors_apply_tau_calibration_prior_and_head_in_that_order():
    rng = np.random.default_rng(0)
    z, f = rng.normal(size=(6, 2)), rng.normal(size=(6, 4))
    prior_train = np.array([0.4, 0.6])
    post = Posteriors(prior_train=prior_train, logit_adjust=1.0, calibration=BCTS(2.0, np.array([0.0, 0.3])),
                      prior_site=np.array([0.8, 0.2]), head=(rng.normal(size=(2, 4)), np.zeros(2)))
    out = post(z, f)
    g = np.log(softmax(z + np.log(prior_train), axis=1))
    assert np.allclose(out["probability"], softmax(z + np.log(prior_train), axis=1)[:, 1])
    q = softmax(g / 2.0 + np.array([0.0, 0.3]), axis=1)
    assert np.allclose(out["probability_corrected"], correct_posteriors(q, np.array([0.8, 0.2]), prior_train)[:, 1])
    assert np.allclose(out["probability_personalised"], softmax(f @ post.head[0].T, axis=1)[:, 1])
    plain = Posteriors(prior_train=prior_train)(z, f)
    assert np.allclose(plain["probability"], plain["probability_corrected"])
    assert np.all(np.isnan(plain["probability_personalised"]))


def _run(tmp_path, run_id):
    return RunModel(tmp_path / "run", run_id, 3, {}, {}, {})


def test_a_work_folder_of_another_run_is_refused_naming_both_runs(tmp_path):
    work = tmp_path / "work"
    LocalStateStore(work, "aaaa1111").save(3, {"w": torch.zeros(2)})
    with pytest.raises(SiteModelError, match="not from run bbbb2222.*aaaa1111"):
        site_local_state(_run(tmp_path, "bbbb2222"), work)
    assert site_local_state(_run(tmp_path, "aaaa1111"), work)[0] == 3
    with pytest.raises(SiteModelError, match="not found"):
        site_local_state(_run(tmp_path, "aaaa1111"), tmp_path / "missing")


def test_patient_bootstrap_resamples_patients_not_images():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    y = np.repeat(labels, 5)  # 5 images per patient, scored almost alike
    p = np.repeat(labels * 0.3 + rng.normal(0.35, 0.25, 40), 5) + rng.normal(0, 0.02, y.size)
    by_image = patient_bootstrap_auc(y, p, [str(i) for i in range(y.size)], n_boot=400)
    by_patient = patient_bootstrap_auc(y, p, [str(i // 5) for i in range(y.size)], n_boot=400)
    assert by_image[0] < by_image[1] and by_patient[0] < by_patient[1]
    # 5 correlated images per patient are not 5 independent pieces of evidence: the interval widens
    assert by_patient[1] - by_patient[0] > 1.5 * (by_image[1] - by_image[0])
    assert patient_bootstrap_auc(np.zeros(5), np.linspace(0, 1, 5), list("abcde")) is None


def test_evaluate_scores_counts_the_confusion_matrix_at_the_threshold():
    y = np.array([0, 0, 1, 1, 1])
    probs = {"probability": np.array([0.1, 0.6, 0.7, 0.2, 0.9]),
             "probability_corrected": np.array([0.1, 0.6, 0.7, 0.2, 0.9])}
    out = evaluate_scores(y, probs, probs["probability_corrected"] >= 0.5, list("abcde"), threshold=0.5,
                          decision_on="probability_corrected")
    assert out["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}
    assert out["sensitivity"] == pytest.approx(2 / 3) and out["specificity"] == pytest.approx(0.5)
    assert out["auc"] == pytest.approx(5 / 6)  # 5 of the 6 (malignant, benign) pairs ranked right


def test_a_folder_is_scored_per_split_in_labels_order_and_bad_files_are_skipped(tmp_path):
    site = tmp_path / "s"
    rows = ["image,label,split,patient"]
    for i, (label, split) in enumerate([("1", "test"), ("", "train"), ("0", "test"), ("0", "train"), ("1", "test")]):
        write_dicom(site / f"{i}.dcm", np.full((40, 40), 1000 + 50 * i, np.uint16), intercept=-1024, slope=1)
        rows.append(f"{i}.dcm,{label},{split},p{i // 2}")
    (site / "2.dcm").write_bytes(b"garbage")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    folder = read_site_folder(site, Preprocessor(spacing_mm=1.0, fov_mm=16.0))
    seen = []

    def outputs(x):
        seen.append(len(x))
        return np.stack([np.zeros(len(x)), x[:, 0, 0, 0]], axis=1).astype(np.float64), np.zeros((len(x), 3))

    scored = score_folder(folder, outputs, Posteriors(prior_train=np.array([0.5, 0.5])), split="all")
    assert scored.images == ["3.dcm", "0.dcm", "4.dcm", "1.dcm"]  # train, test, unlabelled; each in file order
    assert scored.splits == ["train", "test", "test", "train"] and list(scored.labels) == [0, 1, 1, -1]
    assert scored.patients == ["p1", "p0", "p2", "p0"] and seen == [1, 2, 1]
    assert [s.file for s in scored.skipped] == ["2.dcm"] and "line 4" in scored.skipped[0].reason
    test = score_folder(folder, outputs, Posteriors(prior_train=np.array([0.5, 0.5])), split="test")
    assert test.images == ["0.dcm", "4.dcm"]
    assert np.allclose(test.probabilities["probability"], scored.probabilities["probability"][1:3])


def test_runs_predict_or_export_cannot_score_faithfully_are_refused_before_any_image_is_read(tmp_path):
    from fedrad.client.site_model import assemble, check_scorable
    from fedrad.common.config import RunConfig

    check_scorable(RunConfig())  # a classification run with one input per image: scorable
    check_scorable(RunConfig(slice_mode="2.5d"))
    check_scorable(RunConfig(task="survival"))  # predict / evaluate score its risks
    with pytest.raises(SiteModelError, match=r"run R: task = survival: fedrad export writes classification"):
        check_scorable(RunConfig(task="survival"), "R", survival_ok=False)
    with pytest.raises(SiteModelError, match="slices-per-lesion = 5 .*slices-per-lesion = 1"):
        check_scorable(RunConfig(slices_per_lesion=5))
    bag = RunModel(tmp_path / "run", "aaaa1111", 5, RunConfig(slices_per_lesion=3).to_run_config(), {}, {})
    with pytest.raises(SiteModelError, match="slices-per-lesion = 3"):
        assemble(bag, work=tmp_path / "work", bn="site")


def test_the_model_card_rebuilds_a_series_runs_slice_mode(tmp_path):
    from fedrad.client.model_card import preprocessing_of, preprocessor_from_card
    from fedrad.common.config import RunConfig

    cfg = RunConfig(slice_mode="2.5d", slab_mm=3.0)
    pre = Preprocessor(spacing_mm=cfg.spacing_mm, fov_mm=cfg.fov_mm, slice_mode=cfg.slice_mode, slab_mm=cfg.slab_mm)
    card = {"preprocessing": preprocessing_of(cfg, pre)}
    rebuilt = preprocessor_from_card(card)
    assert repr(rebuilt) == repr(pre) and rebuilt.slice_mode == "2.5d" and rebuilt.slab_mm == 3.0
    old = {"preprocessing": {k: v for k, v in card["preprocessing"].items() if k not in ("slice_mode", "slab_mm")}}
    with pytest.raises(ValueError, match="rebuilds to"):  # a card without the mode (older fedrad) cannot pass for it
        preprocessor_from_card(old)


def test_a_series_site_is_read_for_scoring_with_each_input_matched_to_its_row(tmp_path):
    """predict used to find no labels.csv row for a series input ('labels.csv changed while it was read')."""
    from fedrad.lab.series_export import write_seg, write_series

    k, r, c = np.mgrid[0:12, 0:40, 0:48]
    site = tmp_path / "site"
    rows = ["image,series,mask,label,split"]
    for i, shift in enumerate((0, 6)):
        mask = ((k - 5.3) / 3.0) ** 2 + ((r - 18 - shift) / 6.0) ** 2 + ((c - 22) / 8.0) ** 2 < 1
        hu = np.where(mask, 60.0 + 20 * i, -40.0).astype(np.float32)
        written = write_series(site / "ct" / f"p{i}", hu, (2.5, 0.8, 0.8), origin_mm=(-20.0, -16.0, 10.0))
        write_seg(site / f"p{i}.seg.dcm", written, mask)
        rows.append(f",ct/p{i},p{i}.seg.dcm,{i},{'train' if i == 0 else 'test'}")
    (site / "flat.dcm").write_bytes(sorted((site / "ct" / "p0").iterdir())[5].read_bytes())
    rows.append("flat.dcm,,,1,train")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    for mode in ("largest", "2.5d"):
        folder = read_site_folder(site, Preprocessor(spacing_mm=1.0, fov_mm=24.0, slice_mode=mode))
        assert folder.paths == ["ct/p0", "flat.dcm", "ct/p1"] and folder.splits == ["train", "train", "test"]
        assert folder.labels.tolist() == [0, 1, 1]
