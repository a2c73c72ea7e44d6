"""A site's evaluation under label and concept shift. No Flower: arrays and the model in, scalars out.

Every round the site scores its test split with the global model's posterior under the
federation's training prior π_train (sent by the coordinator, formed from all sites'
labelled counts): with the logit-adjusted loss the model's logits carry no prior, and
p_train(y|x) = softmax(z + τ log π_train).

In the last round (`label-shift` on) the site also, all locally:
1. calibrates: BCTS on its held-out labelled rows (`client.holdout`), fitted so that the
   calibrated posteriors q describe π_train, not the site's own prevalence;
2. estimates its prior on its deployment images D (its unlabelled images plus its test
   images with the labels hidden) by EM on q, and by BBSE as a second estimate;
3. corrects: p_site(y|x) ∝ q(y|x) · π_EM(y) / π_train(y), and measures ECE, Brier score
   and balanced accuracy on its test split before and after;
4. personalises a copy of its decision layer on its labelled images (`client.personalise`)
   and measures how often it disagrees with the corrected global model on D (concept shift).
What leaves the site are scalar aggregates only; the fitted calibration, the estimates and
the personalised head are written to the site's own work folder. Anything degenerate (a
class absent, too few held-out images, no unlabelled images, EM not converging) raises a
`ShiftFlag`, is logged with the site's name, and leaves the posteriors uncorrected.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax, softmax
from sklearn.metrics import roc_auc_score

from client.dataset import SiteData
from client.features import SiteInputs
from client.holdout import calibration_mask
from client.personalise import disagreement, head_probs, personalise_head
from client.train import NUM_CLASSES, Inputs, autocast
from common.calibration import fit_bcts
from common.config import RunConfig
from common.efficientnet_lite import EfficientNetLite0
from common.labelshift import bbse_prior, correct_posteriors, em_prior, prior_from_counts
from common.metrics import brier_score, classification_metrics
from common.shift_flags import FALLBACK, ShiftFlag, describe

log = logging.getLogger("fedrad.site")


@torch.no_grad()
def model_outputs(model: EfficientNetLite0, inputs: Inputs | None, device: torch.device,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) and penultimate features (N, D) of images (view 0), in eval mode."""
    features: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    n = 0 if inputs is None else inputs.n
    if n == 0:
        return np.zeros((0, NUM_CLASSES)), np.zeros((0, model._fc.in_features))
    hook = model._fc.register_forward_hook(lambda _m, args, _out: features.append(args[0].float().cpu()))
    model.eval()
    try:
        for i in range(0, n, batch_size):
            with autocast(device):
                out = inputs.forward(inputs.batch(torch.arange(i, min(i + batch_size, n)), 0))
            logits.append(out.float().cpu())
    finally:
        hook.remove()
    return torch.cat(logits).double().numpy(), torch.cat(features).double().numpy()


def train_log_posteriors(logits: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """log p_train(y|x) = log softmax(z + τ log π_train): the global model's posterior under the training prior."""
    return log_softmax(logits + tau * np.log(prior), axis=1)


def reference_prior(prior_train: np.ndarray | None, y_labelled: np.ndarray) -> tuple[np.ndarray, ShiftFlag]:
    """π_train from the coordinator, or (flagged) the site's own labelled prior when none came."""
    if prior_train is not None:
        return np.asarray(prior_train, dtype=np.float64), ShiftFlag.NONE
    counts = np.bincount(np.asarray(y_labelled, dtype=int), minlength=NUM_CLASSES)
    return prior_from_counts(counts, smoothing=1.0), ShiftFlag.NO_TRAIN_PRIOR


def evaluate_site(model: EfficientNetLite0, inputs: SiteInputs, data: SiteData, cfg: RunConfig,
                  device: torch.device, *, prior_train: np.ndarray | None, final: bool,
                  work_dir: Path) -> dict[str, float]:
    """Test metrics of the global model under π_train; in the last round also the label-shift analysis."""
    ref, flags = reference_prior(prior_train, data.y_train)
    z_test, f_test = model_outputs(model, inputs.test, device)
    g_test = train_log_posteriors(z_test, ref, cfg.logit_adjust)
    metrics = classification_metrics(data.y_test, np.exp(g_test[:, 1]))
    if final and cfg.label_shift:
        metrics.update(analyse_shift(model, inputs, data, cfg, device, ref=ref, flags=flags, g_test=g_test,
                                     f_test=f_test, work_dir=work_dir))
    return metrics


def analyse_shift(model: EfficientNetLite0, inputs: SiteInputs, data: SiteData, cfg: RunConfig,
                  device: torch.device, *, ref: np.ndarray, flags: ShiftFlag, g_test: np.ndarray,
                  f_test: np.ndarray, work_dir: Path) -> dict[str, float]:
    """Steps 1-4 of the module docstring; returns the finite scalar metrics to report."""
    site, tau = data.name, cfg.logit_adjust
    y_lab, y_test = data.y_train, data.y_test
    cal = calibration_mask(data.keys_train, y_lab, cfg.calibration_fraction, seed=cfg.seed)
    z_lab, f_lab = model_outputs(model, inputs.train, device)
    z_unl, f_unl = model_outputs(model, inputs.unlabelled, device)
    g_lab = train_log_posteriors(z_lab, ref, tau)
    g_deploy = np.concatenate([train_log_posteriors(z_unl, ref, tau), g_test])
    f_deploy = np.concatenate([f_unl, f_test])
    counts = np.bincount(y_lab, minlength=NUM_CLASSES)
    if np.any(counts == 0):
        flags |= ShiftFlag.CLASS_ABSENT
    elif not cal.any():
        flags |= ShiftFlag.FEW_CALIBRATION
    if len(g_deploy) == 0:
        flags |= ShiftFlag.FEW_UNLABELLED
    out: dict[str, float] = {"n-calibration": int(cal.sum()), "n-deploy": len(g_deploy)}
    local: dict[str, object] = {"site": site, "prior_train": ref.tolist()}
    p_test = np.exp(g_test)
    p_deploy_global = np.exp(g_deploy)
    corrected_test = p_test
    if not flags & (ShiftFlag.CLASS_ABSENT | ShiftFlag.FEW_CALIBRATION):
        try:
            calibrate = fit_bcts(g_lab[cal], y_lab[cal], prior_ref=ref,
                                 prior_fit=prior_from_counts(np.bincount(y_lab[cal], minlength=NUM_CLASSES)))
        except ValueError as err:
            log.warning("site %s: calibration failed: %s", site, err)
            flags |= ShiftFlag.FEW_CALIBRATION
        else:
            out.update({"bcts-temperature": calibrate.temperature, "bcts-bias": float(calibrate.bias[1])})
            local.update(bcts_temperature=calibrate.temperature, bcts_bias=calibrate.bias.tolist())
            bbse = bbse_prior(calibrate(g_lab[cal]), y_lab[cal], calibrate(g_deploy))
            if bbse.ok:
                out["prior-bbse"] = float(bbse.prior[1])
            else:
                flags |= ShiftFlag.BBSE_FAILED
                local["bbse"] = bbse.reason
            em = em_prior(calibrate(g_deploy), ref)
            if em.ok:
                out["prior-em"] = float(em.prior[1])
                local["em_iterations"] = em.iterations
                corrected_test = correct_posteriors(calibrate(g_test), em.prior, ref)
                p_deploy_global = correct_posteriors(calibrate(g_deploy), em.prior, ref)
            else:
                flags |= ShiftFlag.EM_FAILED if len(g_deploy) else ShiftFlag.NONE
                local["em"] = em.reason
    if flags & FALLBACK:  # the safe fallback: the global model's own posteriors, uncorrected
        corrected_test, p_deploy_global = p_test, np.exp(g_deploy)
    for name, probs in (("uncorrected", p_test), ("corrected", corrected_test)):
        m = classification_metrics(y_test, probs[:, 1])
        out.update({f"ece-{name}": m["ece"], f"brier-{name}": brier_score(y_test, probs[:, 1]),
                    f"balanced-accuracy-{name}": m["balanced-accuracy"]})
    flags |= _personalise(model, cfg, data, out, f_lab, f_test, f_deploy, p_deploy_global, ref, work_dir)
    out["label-shift-flags"] = int(flags)
    warnings = describe(flags, site)
    for warning in warnings:
        log.warning("%s", warning)
    local.update({k: v for k, v in out.items()}, warnings=warnings)
    _write_json(work_dir / "label-shift.json", local)
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}


def _personalise(model: EfficientNetLite0, cfg: RunConfig, data: SiteData, out: dict[str, float],
                 f_lab: np.ndarray, f_test: np.ndarray, f_deploy: np.ndarray, p_deploy_global: np.ndarray,
                 ref: np.ndarray, work_dir: Path) -> ShiftFlag:
    """Fine-tune a site-only head (kept in the work folder); add its AUC and disagreement to `out`."""
    if cfg.personalise_epochs == 0:
        return ShiftFlag.NONE
    weight = model._fc.weight.detach().double().cpu().numpy()
    # start from the global decision under π_train: the prior term becomes part of the bias
    bias = model._fc.bias.detach().double().cpu().numpy() + cfg.logit_adjust * np.log(ref)
    try:
        weight, bias = personalise_head(f_lab, data.y_train, weight, bias, epochs=cfg.personalise_epochs,
                                        lr=cfg.personalise_lr, seed=cfg.seed)
    except ValueError as err:
        log.warning("site %s: %s", data.name, err)
        return ShiftFlag.NOT_PERSONALISED
    p_test = head_probs(f_test, weight, bias)
    if np.unique(data.y_test).size == 2:
        out["auc-personalised"] = float(roc_auc_score(data.y_test, p_test[:, 1]))
    rate = disagreement(head_probs(f_deploy, weight, bias), p_deploy_global)
    out["disagreement"] = rate
    if np.isfinite(rate):
        out["concept-shift"] = int(rate >= cfg.disagreement_threshold)
    work_dir.mkdir(parents=True, exist_ok=True)
    np.savez(work_dir / "personalised-head.npz", weight=weight, bias=bias)
    return ShiftFlag.NONE


def _write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))
