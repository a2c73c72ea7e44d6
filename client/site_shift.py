"""A site's evaluation under label and concept shift. No Flower: arrays and the model in, scalars out.

Every round the site scores its test split with the global model's posterior under the
federation's training prior π_train (sent by the coordinator, formed from all sites'
labelled counts): with the logit-adjusted loss the model's logits carry no prior, and
p_train(y|x) = softmax(z + τ log π_train).

In the last round (`label-shift` on) the site also, all locally:
1. calibrates: BCTS on its labelled test split (held out from training), fitted so that
   the calibrated posteriors q describe π_train, not the site's own prevalence;
2. estimates its prior on its unlabelled images by EM on q (BBSE as a second estimate,
   cross-fitted: its confusion matrix is measured on one fold of the test split through a
   calibration map fitted on the other, the two estimates averaged);
   a site with fewer than MIN_UNLABELLED unlabelled images uses its labelled prior;
3. corrects: p_site(y|x) ∝ q(y|x) · π_site(y) / π_train(y), and reports ECE, Brier score
   and balanced accuracy on its test split before and after, and the ECE that perfectly
   calibrated posteriors would score at this test size (`ece-floor`: ECE is biased upward
   on a few hundred images, so a gain below the floor is not a gain). Calibration and estimate
   are cross-fitted (`fedrad.client.folds`): each test image is corrected by maps fitted on the
   other fold, so no image is scored by a map fitted on its own label. Where the site has a
   deployment evaluation set (`fedrad.client.deploy_eval`: labelled images of the population
   it is deployed on, read only for this), every correction (none, labelled prior, EM, BBSE,
   oracle prior) is also scored there;
4. personalises a copy of its decision layer on its own labels (`fedrad.client.personalise`),
   cross-fitted the same way, and reports its AUC and how often its decisions disagree
   with the federation's reading of the site's images (a sign of concept shift): the
   global model calibrated by temperature only, re-weighted to the prior EM infers from
   the site's images with their labels hidden. Neither may learn from the site's labels
   where its decision threshold lies: a threshold moved by a stricter labelling rule is
   exactly what concept shift looks like, and a per-site bias, or the site's labelled
   prior, would absorb it and hide it.
Only scalar aggregates leave the site; the calibration, the estimates and the
personalised head (fitted on all the site's labels) stay in its work folder. Anything
degenerate raises a `ShiftFlag`, is logged with the site's name and, where the flag says
so, leaves the posteriors uncorrected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import log_softmax
from sklearn.metrics import roc_auc_score

from fedrad.client.calibration import BCTS, fit_bcts
from fedrad.client.dataset import SiteData
from fedrad.client.deploy_eval import DeployAudit, score_corrections
from fedrad.client.folds import can_calibrate, two_folds
from fedrad.client.outputs import SiteOutputs
from fedrad.client.personalise import disagreement, head_probs, personalise_head
from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.labelshift import PriorEstimate, bbse_prior, correct_posteriors, em_prior, prior_from_counts
from fedrad.common.metrics import brier_score, classification_metrics, ece_noise_floor, reliability_bins
from fedrad.common.model import NUM_CLASSES
from fedrad.common.shift_flags import FALLBACK, ShiftFlag, describe

MIN_UNLABELLED = 30  # unlabelled images needed before EM's estimate replaces the labelled prior
MIN_CONCEPT_TEST = 80  # labelled test images needed to judge concept shift (disagreement's SE ~ 0.04 there)
log = logging.getLogger("fedrad.site")


def train_log_posteriors(logits: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """log p_train(y|x) = log softmax(z + τ log π_train): the global model's posterior under the training prior."""
    return log_softmax(logits + tau * np.log(prior), axis=1)


def reference_prior(prior_train: np.ndarray | None, y_labelled: np.ndarray) -> tuple[np.ndarray, ShiftFlag]:
    """π_train from the coordinator, or (flagged) the site's own labelled prior when none came."""
    if prior_train is not None:
        return np.asarray(prior_train, dtype=np.float64), ShiftFlag.NONE
    return _counts_prior(y_labelled), ShiftFlag.NO_TRAIN_PRIOR


def _counts_prior(y: np.ndarray) -> np.ndarray:
    return prior_from_counts(np.bincount(np.asarray(y, dtype=int), minlength=NUM_CLASSES), smoothing=1.0)


@dataclass
class SiteCorrection:
    """What `correct_site` found: scalars to report and per-image posteriors that stay at the site."""

    metrics: dict[str, float]
    corrected: np.ndarray  # (N, K) calibrated, prior-corrected test posteriors (cross-fitted)
    reference: np.ndarray  # (N, K) temperature-scaled posteriors under the images' EM prior (cross-fitted)
    flags: ShiftFlag = ShiftFlag.NONE
    calibrate: BCTS | None = field(default=None)  # fitted on all test images: the map the site keeps
    priors: dict[str, np.ndarray] = field(default_factory=dict)  # "labelled", "em", "bbse": each prior found
    bbse_reason: str = ""  # why BBSE gave no estimate, in words (kept at the site)


def evaluate_site(model: EfficientNetLite0, outputs: SiteOutputs, data: SiteData, cfg: RunConfig, *,
                  prior_train: np.ndarray | None, final: bool, work_dir: Path,
                  audit: DeployAudit | None = None) -> dict[str, float]:
    """Test metrics of the global model under π_train; in the last round also the label-shift analysis.

    `outputs` are the model's outputs on this site's inputs (`fedrad.client.outputs`);
    `audit` the deployment evaluation set (last round only; its labels serve the scoring alone).
    """
    ref, flags = reference_prior(prior_train, data.y_train)
    z_test, f_test = outputs("test")
    g_test = train_log_posteriors(z_test, ref, cfg.logit_adjust)
    metrics = classification_metrics(data.y_test, np.exp(g_test[:, 1]))
    if not (final and cfg.label_shift):
        return metrics
    z_unl, _ = outputs("unlabelled")
    folds = two_folds(data.keys_test, data.y_test, seed=cfg.seed)
    fix = correct_site(g_test, data.y_test, folds, train_log_posteriors(z_unl, ref, cfg.logit_adjust), ref,
                       _counts_prior(data.y_train), flags, balanced=cfg.bcts_balanced)
    out, flags = fix.metrics, fix.flags
    out["prior-labelled"] = float(_counts_prior(data.y_train)[1])
    if audit is not None:
        out.update(score_corrections(audit, train_log_posteriors(audit.logits, ref, cfg.logit_adjust), ref,
                                     fix.calibrate, fix.priors))
    if cfg.personalise_steps:
        _, f_lab = outputs("train")
        bias = model._fc.bias.detach().double().cpu().numpy() + cfg.logit_adjust * np.log(ref)
        personal, head = personalise_site(f_lab, data.y_train, f_test, data.y_test, folds, fix.reference,
                                          model._fc.weight.detach().double().cpu().numpy(), bias, cfg)
        out.update(personal)
        if head is None:
            flags |= ShiftFlag.NOT_PERSONALISED
        else:
            work_dir.mkdir(parents=True, exist_ok=True)
            np.savez(work_dir / "personalised-head.npz", weight=head[0], bias=head[1])
    out["label-shift-flags"] = int(flags)
    warnings = describe(flags, data.name)
    for warning in warnings:
        log.warning("%s", warning)
    finite = {k: (float(v) if np.isfinite(v) else None) for k, v in out.items()}
    record = {"site": data.name, "prior_train": ref.tolist(), **finite, "warnings": warnings}
    if fix.bbse_reason:
        record["bbse_reason"] = fix.bbse_reason
    if fix.calibrate is not None:
        record.update(bcts_temperature=fix.calibrate.temperature, bcts_bias=fix.calibrate.bias.tolist())
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "label-shift.json").write_text(json.dumps(record, indent=2, default=float))
    return {**metrics, **{k: float(v) for k, v in out.items() if np.isfinite(v)}}


def correct_site(g_test: np.ndarray, y_test: np.ndarray, folds: np.ndarray, g_unl: np.ndarray, ref: np.ndarray,
                 labelled_prior: np.ndarray, flags: ShiftFlag = ShiftFlag.NONE, *,
                 balanced: bool = False) -> SiteCorrection:
    """Steps 1-3: estimates on the unlabelled images, cross-fitted correction of the test split.

    Args:
        g_test: log p_train(y|x) of the test images (N, K); y_test: their labels; folds: 0/1 per image.
        g_unl: log p_train(y|x) of the unlabelled images (M, K).
        ref: π_train; labelled_prior: the site's prior from its labelled training counts.
        flags: Flags raised before (e.g. no training prior came).
        balanced: Fit every BCTS map class-balanced (run-config `bcts-balanced`).
    """
    p_test = np.exp(g_test)
    out: dict[str, float] = {"n-unlabelled": len(g_unl)}
    use_em = len(g_unl) >= MIN_UNLABELLED
    if not use_em:
        flags |= ShiftFlag.FEW_UNLABELLED
    if np.any(np.bincount(y_test, minlength=NUM_CLASSES) == 0):
        flags |= ShiftFlag.CLASS_ABSENT
    elif not all(can_calibrate(y_test[folds == f]) for f in (0, 1)):
        flags |= ShiftFlag.FEW_CALIBRATION
    calibrate = None
    priors: dict[str, np.ndarray] = {"labelled": labelled_prior}
    bbse_reason = ""
    if not flags & (ShiftFlag.CLASS_ABSENT | ShiftFlag.FEW_CALIBRATION):
        calibrate = _calibrate(g_test, y_test, ref, balanced=balanced)
        out.update({"bcts-temperature": calibrate.temperature, "bcts-bias": float(calibrate.bias[1])})
        prior_site = labelled_prior
        if use_em:
            em = em_prior(calibrate(g_unl), ref)
            if em.ok:
                out["prior-em"] = float(em.prior[1])
                prior_site = priors["em"] = em.prior
            else:
                flags |= ShiftFlag.EM_FAILED
            bbse = bbse_cross_fitted(g_test, y_test, folds, g_unl, ref, balanced=balanced)
            if bbse.ok:
                out["prior-bbse"] = float(bbse.prior[1])
                priors["bbse"] = bbse.prior
            else:
                flags |= ShiftFlag.BBSE_FAILED
                bbse_reason = bbse.reason  # in the site's label-shift.json; the flag's sentence in the report
        out["prior-site"] = float(prior_site[1])
    corrected, reference = p_test.copy(), p_test.copy()
    for f in (0, 1):
        fit, score = folds != f, folds == f
        temperature = BCTS.identity(NUM_CLASSES) if calibrate is None else _calibrate(g_test[fit], y_test[fit], ref,
                                                                                       bias=False, balanced=balanced)
        reference[score] = _federation_view(temperature, g_test[score], np.concatenate([g_unl, g_test]), ref)
    for f in (0, 1) if not flags & FALLBACK else ():
        fit, score = folds != f, folds == f
        cal_f = _calibrate(g_test[fit], y_test[fit], ref, balanced=balanced)
        prior_f = labelled_prior
        if use_em:
            em_f = em_prior(cal_f(g_unl), ref)
            if not em_f.ok:
                flags |= ShiftFlag.EM_FAILED
                break
            prior_f = em_f.prior
        corrected[score] = correct_posteriors(cal_f(g_test[score]), prior_f, ref)
    if flags & FALLBACK:  # the safe fallback: the global model's own posteriors, uncorrected
        corrected = p_test
        out.pop("prior-site", None)
    for name, probs in (("uncorrected", p_test), ("corrected", corrected)):
        m = classification_metrics(y_test, probs[:, 1])
        out.update({f"ece-{name}": m["ece"], f"brier-{name}": brier_score(y_test, probs[:, 1]),
                    f"balanced-accuracy-{name}": m["balanced-accuracy"]})
        for b, (n, conf, pos) in enumerate(reliability_bins(y_test, probs[:, 1])):  # the diagram's aggregates
            out.update({f"rel-{name}-{b}-n": n} if n == 0 else
                       {f"rel-{name}-{b}-n": n, f"rel-{name}-{b}-conf": conf, f"rel-{name}-{b}-pos": pos})
    out["ece-floor"] = ece_noise_floor(corrected[:, 1])  # what ECE perfect calibration scores at this test size
    return SiteCorrection(out, corrected, reference, flags, calibrate, priors, bbse_reason)


def bbse_cross_fitted(g_test: np.ndarray, y_test: np.ndarray, folds: np.ndarray, g_unl: np.ndarray,
                      ref: np.ndarray, *, balanced: bool = False) -> PriorEstimate:
    """BBSE whose confusion matrix never sees predictions from a map fitted on the same labels.

    For each fold: BCTS fitted on the other fold; the confusion matrix from this fold's
    predictions through that map; the unlabelled images' prediction rates through the same
    map. The two estimates are averaged. Fitting the map and the confusion matrix on the
    same images made the matrix optimistic. Either fold refused (`bbse_prior`'s
    |TPR − FPR| guard, a class absent) → no estimate, with that fold's reason.
    """
    estimates = []
    for f in (0, 1):
        fit, score = folds != f, folds == f
        cal = _calibrate(g_test[fit], y_test[fit], ref, balanced=balanced)
        est = bbse_prior(cal(g_test[score]), y_test[score], cal(g_unl))
        if not est.ok:
            return PriorEstimate(None, 0, f"fold {f}: {est.reason}")
        estimates.append(est.prior)
    prior = np.mean(estimates, axis=0)
    return PriorEstimate(prior / prior.sum())


def _federation_view(temperature: BCTS, g_score: np.ndarray, g_images: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The global model's posteriors for images `g_score` under the prior it reads off the site's images.

    Temperature-scaled (identity where the site cannot calibrate), re-weighted to the EM
    prior of `g_images` (the site's unlabelled and test images, labels unseen); π_train
    where EM fails.
    """
    if len(g_score) == 0:
        return np.zeros((0, NUM_CLASSES))
    q = temperature(g_score)
    em = em_prior(temperature(g_images), ref)
    return correct_posteriors(q, em.prior, ref) if em.ok else q


def _calibrate(g: np.ndarray, y: np.ndarray, ref: np.ndarray, *, bias: bool = True, balanced: bool = False) -> BCTS:
    """BCTS on held-out images whose own prior (from their labels) is factored out: q describes π_ref."""
    return fit_bcts(g, y, prior_fit=prior_from_counts(np.bincount(y, minlength=NUM_CLASSES), smoothing=1.0),
                    prior_ref=ref, bias=bias, class_balanced=balanced)


def personalise_site(f_lab: np.ndarray, y_lab: np.ndarray, f_test: np.ndarray, y_test: np.ndarray,
                     folds: np.ndarray, reference: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                     cfg: RunConfig) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray] | None]:
    """Step 4: cross-fitted personalised head vs the global model's `reference` posteriors on the test split.

    For each fold, a copy of the head (`weight`, `bias`: the global decision under π_train)
    is fine-tuned on the training images plus the other fold and scores this fold. The
    head the site keeps is fine-tuned on all its labelled images. Returns the scalars and
    that head, or ({}, None) when it cannot be fitted (one class only). Concept shift
    is judged (flag 0/1) only with at least MIN_CONCEPT_TEST test images.
    """
    def fit(features: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return personalise_head(features, y, weight, bias, steps=cfg.personalise_steps, l2=cfg.personalise_l2)

    try:
        head = fit(np.concatenate([f_lab, f_test]), np.concatenate([y_lab, y_test]))
        personal = np.zeros_like(reference)
        for f in (0, 1):
            w, b = fit(np.concatenate([f_lab, f_test[folds != f]]), np.concatenate([y_lab, y_test[folds != f]]))
            personal[folds == f] = head_probs(f_test[folds == f], w, b)
    except ValueError:  # one class only: nothing to personalise (ShiftFlag.NOT_PERSONALISED)
        return {}, None
    out: dict[str, float] = {}
    if np.unique(y_test).size == 2:
        out["auc-personalised"] = float(roc_auc_score(y_test, personal[:, 1]))
    rate = disagreement(personal, reference)
    if np.isfinite(rate):
        out["disagreement"] = rate
    if len(y_test) >= MIN_CONCEPT_TEST:  # fewer test images: the rate is too noisy to judge
        out["concept-shift"] = int(rate >= cfg.disagreement_threshold)
    return out, head
