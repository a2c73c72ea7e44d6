"""A site's own model after a federation, put together from the run and the site's own folder.

After `fedrad simulate` or a deployment, what a hospital scores its new patients with is not
the coordinator's model alone. It is:

- the shared layers of the run (`global.npz`, `shared/…`),
- the site's own BatchNorm of the run's last round (`<work>/local-state/<run-id>/round-N.npz`),
- its decision layer: the federation's, and the personalised copy it kept (`personalised-head.npz`),
- its calibration (BCTS) and the prior it estimated (`label-shift.json`), with π_train.

A site that never trained has no work folder: it gets the shared layers with the pooled BN
statistics, or AdaBN on its own images (`fedrad.client.unseen`), no calibration and π_train as
its prior. Nothing here talks to anyone; the run folder is read as files. No Flower, and no
import of the coordinator's package: `RunModel` is the plain content of `global.npz`/`global.json`.

The model's outputs are computed the way the run's evaluation computed them (frozen prefix in
batches of 16, then the trainable suffix in batches of 64, per labels.csv split), so a site's
test split scored here gives the run's own test AUC, not a float-rounding neighbour of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import log_softmax

from fedrad.client.calibration import BCTS
from fedrad.client.features import compute_prefix
from fedrad.client.local_state import LocalStateStore
from fedrad.client.outputs import model_outputs
from fedrad.client.personalise import head_probs
from fedrad.client.train import cached_inputs, pick_device, pixel_inputs
from fedrad.client.unseen import global_model_for_site
from fedrad.common.bn import recalibrate_bn
from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.finetune import first_trainable_unit, local_keys
from fedrad.common.labelshift import correct_posteriors

log = logging.getLogger("fedrad.site")
BNSource = Literal["site", "pooled", "adabn"]
LABEL_SHIFT_FILE, HEAD_FILE = "label-shift.json", "personalised-head.npz"


class SiteModelError(ValueError):
    """The run folder and the site's work folder do not make one model (the message says which and why)."""


def check_scorable(cfg: RunConfig, folder: Path | str = "", *, survival_ok: bool = True) -> None:
    """Refuse, before any image is read, a run that predict / evaluate / export cannot score faithfully.

    A slice bag (`slices-per-lesion` > 1) averages k inputs per patient, which the scorer does not
    rebuild. `survival_ok = False` (export): a `task = survival` run has a Cox head and, maybe,
    covariates that an exported graph of the network alone would not carry.
    """
    where = f"run {folder}: " if folder else ""
    if cfg.task == "survival" and not survival_ok:
        raise SiteModelError(f"{where}task = survival: fedrad export writes classification models; score a "
                             "survival run with fedrad predict / evaluate --model (per-patient risk, C-index).")
    if cfg.slices_per_lesion > 1:
        raise SiteModelError(f"{where}slices-per-lesion = {cfg.slices_per_lesion} (a slice bag): predict scores one "
                             "input per image and does not rebuild the bag's k-slice average; use a run with "
                             "slices-per-lesion = 1.")


@dataclass(frozen=True)
class RunModel:
    """What the run's coordinator wrote: `global.npz` + `global.json` (+ π_train from `report.json`).

    Attributes:
        folder: The run folder.
        run_id: The run's federation id ('' for runs saved before it was recorded).
        server_round: The round the weights are from.
        config: The run config (kebab-case).
        shared: Shared weights by state-dict key.
        bn_pooled: BN statistics pooled over the training sites.
        prior_train: P(malignant) the federation trained on (report.json), None if unknown.
    """

    folder: Path
    run_id: str
    server_round: int
    config: dict[str, Any]
    shared: dict[str, np.ndarray]
    bn_pooled: dict[str, np.ndarray]
    prior_train: float | None = None


@dataclass
class Posteriors:
    """The site's corrections of its model's logits (all kept at the site).

    Attributes:
        prior_train: π_train (K,): the prior the federation's posteriors describe.
        logit_adjust: τ of the run: p_train(y|x) = softmax(z + τ log π_train).
        calibration: BCTS fitted at the site's last round, None if it could not calibrate.
        prior_site: The site's prior (K,) the corrected posteriors are re-weighted to; None = π_train.
        prior_source: Where `prior_site` came from, in words.
        head: The personalised decision layer (weight (K, D), bias (K,)), None if the site has none.
    """

    prior_train: np.ndarray
    logit_adjust: float = 0.0
    calibration: BCTS | None = None
    prior_site: np.ndarray | None = None
    prior_source: str = "π_train (no estimate)"
    head: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, logits: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        """P(malignant) per image: `probability` (the federation's, under π_train, as the run scored it),
        `probability_corrected` (calibrated, re-weighted to the site's prior) and
        `probability_personalised` (the site's own decision layer; NaN without one)."""
        g = log_softmax(np.asarray(logits, np.float64) + self.logit_adjust * np.log(self.prior_train), axis=1)
        p = np.exp(g)
        q = self.calibration(g) if self.calibration is not None else p
        corrected = correct_posteriors(q, self.prior_site, self.prior_train) if self.prior_site is not None else q
        personal = (head_probs(features, *self.head)[:, 1] if self.head is not None
                    else np.full(len(p), np.nan))
        return {"probability": p[:, 1], "probability_corrected": corrected[:, 1], "probability_personalised": personal}

    def describe(self) -> dict[str, Any]:
        """JSON-ready: what the model card says about the corrections."""
        return {
            "prior_train": float(self.prior_train[1]), "logit_adjust": self.logit_adjust,
            "calibration": None if self.calibration is None else {
                "method": "BCTS (bias-corrected temperature scaling): softmax(log p_train / T + b)",
                "temperature": float(self.calibration.temperature), "bias": [float(b) for b in self.calibration.bias]},
            "prior": {"p_malignant": None if self.prior_site is None else float(self.prior_site[1]),
                      "source": self.prior_source},
            "personalised_head": self.head is not None,
        }


@dataclass
class SiteModel:
    """The assembled model: network + corrections + where each part came from."""

    cfg: RunConfig
    model: EfficientNetLite0
    posteriors: Posteriors
    run: RunModel
    bn: str  # e.g. "site h0, round 5", "pooled", "adabn on 120 images"
    site: str = ""
    notes: list[str] = field(default_factory=list)

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, K) and penultimate features (N, D) of CNN inputs `x` (N, 3, S, S), float64.

        The same path as the run's evaluation: the frozen prefix in its batches, then the suffix.
        """
        device = pick_device(self.cfg.device)
        start = first_trainable_unit(self.cfg.freeze_blocks)
        if len(x) == 0:
            return model_outputs(self.model, None, device)
        if self.cfg.feature_cache and start > 0:
            inputs = cached_inputs(self.model, compute_prefix(self.model, x, start, 1, device), start, device)
        else:
            inputs = pixel_inputs(self.model, x, 1, device)
        return model_outputs(self.model, inputs, device)

    def sha256(self) -> str:
        """Digest of everything that decides a prediction: every weight and every correction."""
        digest = hashlib.sha256()
        for key, value in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digest.update(json.dumps(self.posteriors.describe(), sort_keys=True).encode())
        if self.posteriors.head is not None:
            for part in self.posteriors.head:
                digest.update(np.ascontiguousarray(part, np.float64).tobytes())
        return digest.hexdigest()


def run_ids_in(work: Path) -> list[str]:
    """Run ids whose BatchNorm this site work folder keeps (`local-state/<run-id>/`)."""
    folder = Path(work) / "local-state"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _newest_round_file(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.glob("round-*.npz")), default=0.0)


def site_local_state(run: RunModel, work: Path) -> tuple[int, dict[str, torch.Tensor], str]:
    """(round, BN tensors, run id) of the site's own state for `run`; refuses a folder of another run."""
    work = Path(work)
    if not work.is_dir():
        raise SiteModelError(f"site work folder {work} not found; give the folder the site trained with "
                             "(fedrad simulate: RUN/sites/<site>), or use --bn pooled|adabn for a site that never trained.")
    found = run_ids_in(work)
    run_id = run.run_id
    if not run_id:  # a run saved before global.json recorded its id: only a folder of exactly one run is unambiguous
        if len(found) != 1:
            raise SiteModelError(f"{run.folder / 'global.json'} names no run id and {work} holds state of "
                                 f"{len(found)} runs ({', '.join(found) or 'none'}); cannot tell which is this run's.")
        run_id = found[0]
    if run_id not in found:
        raise SiteModelError(f"site work folder {work} is not from run {run_id} ({run.folder}): it holds the state "
                             f"of run(s) {', '.join(found) or '(none)'}; give this run's site work folder, or use "
                             "--bn pooled|adabn.")
    state = LocalStateStore(work, run_id).latest(run.server_round)
    if state is None:
        raise SiteModelError(f"site work folder {work} has no BatchNorm of run {run_id} up to round "
                             f"{run.server_round}; did this site train in that run?")
    newer = [other for other in found if other != run_id
             and _newest_round_file(work / "local-state" / other) > _newest_round_file(work / "local-state" / run_id)]
    if newer and (work / LABEL_SHIFT_FILE).is_file():
        raise SiteModelError(f"site work folder {work} was used by run(s) {', '.join(newer)} after run {run_id}: "
                             f"its {LABEL_SHIFT_FILE} and {HEAD_FILE} are theirs, not run {run_id}'s; predict with "
                             f"the run folder of {newer[-1]}.")
    return state[0], state[1], run_id


def site_posteriors(run: RunModel, cfg: RunConfig, work: Path | None, n_features: int) -> Posteriors:
    """The site's calibration, prior and personalised head from its work folder (π_train alone without one)."""
    record: dict[str, Any] = {}
    path = None if work is None else Path(work) / LABEL_SHIFT_FILE
    if path is not None and path.is_file():
        try:
            record = json.loads(path.read_text())
        except ValueError as err:
            raise SiteModelError(f"{path} is not valid JSON ({err}); run the federation's last round again.") from err
    if record.get("prior_train"):
        prior_train = np.asarray(record["prior_train"], np.float64)
    elif run.prior_train is not None:
        prior_train = np.array([1.0 - run.prior_train, run.prior_train])
    else:
        if cfg.logit_adjust:
            raise SiteModelError(f"run {run.folder} has logit-adjust {cfg.logit_adjust} but neither its "
                                 f"report.json nor the site's {LABEL_SHIFT_FILE} gives π_train.")
        prior_train = np.array([0.5, 0.5])
    out = Posteriors(prior_train=prior_train, logit_adjust=cfg.logit_adjust)
    if record.get("bcts_temperature") is not None:
        out.calibration = BCTS(float(record["bcts_temperature"]), np.asarray(record["bcts_bias"], np.float64))
    if record.get("prior-site") is not None:
        p = float(record["prior-site"])
        out.prior_site = np.array([1.0 - p, p])
        out.prior_source = ("EM on the site's unlabelled images" if record.get("prior-em") is not None
                            and math.isclose(record["prior-em"], p) else "the site's labelled prior")
    head = None if work is None else Path(work) / HEAD_FILE
    if head is not None and head.is_file():
        with np.load(head, allow_pickle=False) as f:
            weight, bias = np.asarray(f["weight"], np.float64), np.asarray(f["bias"], np.float64)
        if weight.shape[1] != n_features:
            raise SiteModelError(f"{head}: a decision layer on {weight.shape[1]} features; the model has {n_features}.")
        out.head = (weight, bias)
    return out


def assemble(run: RunModel, *, work: Path | None, bn: BNSource = "site",
             adapt_images: np.ndarray | None = None, site: str = "") -> SiteModel:
    """The site's model: shared layers + BN (`site`: its own; `pooled`; `adabn` on `adapt_images`) + corrections.

    Raises:
        SiteModelError: no work folder for `bn="site"`, a work folder of another run, too few
            images for AdaBN, or a config predict cannot reproduce (`prefix-bn = site`).
    """
    check_scorable(RunConfig.from_run_config(run.config), run.folder)
    cfg, model = global_model_for_site(run.config, {**run.shared, **run.bn_pooled})
    if cfg.prefix_bn == "site" and first_trainable_unit(cfg.freeze_blocks) > 0:
        raise SiteModelError(f"run {run.folder} used prefix-bn = 'site' (the frozen prefix re-normalised on each "
                             "site's training images, kept only in its feature cache): predict does not rebuild "
                             "that prefix yet; use a run with prefix-bn = 'pretrained'.")
    notes: list[str] = []
    if bn == "site":
        if work is None:
            raise SiteModelError("--bn site needs the site's work folder (--site-work); a site that never trained "
                                 "uses --bn pooled or --bn adabn.")
        server_round, state, run_id = site_local_state(run, work)
        keys = set(local_keys(model, cfg.bn_mode))
        unexpected = model.load_state_dict({k: v for k, v in state.items() if k in keys}, strict=False).unexpected_keys
        if unexpected:
            raise SiteModelError(f"{work}: its BatchNorm has tensors this model lacks: {unexpected[:3]}.")
        label = f"site {site or Path(work).name}, round {server_round}"
        posteriors = site_posteriors(run, cfg, work, model._fc.in_features)
        run = RunModel(run.folder, run_id, run.server_round, run.config, run.shared, run.bn_pooled, run.prior_train)
    elif bn in ("pooled", "adabn"):
        label = "pooled"
        if bn == "adabn":
            images = np.zeros((0,), np.float32) if adapt_images is None else adapt_images
            if len(images) < 2:
                raise SiteModelError(f"AdaBN needs at least 2 images of the site; got {len(images)}.")
            batches = torch.tensor_split(torch.from_numpy(images), math.ceil(len(images) / cfg.batch_size))
            recalibrate_bn(model, (b.to(pick_device(cfg.device)) for b in batches))
            label = f"adabn on {len(images)} images"
        posteriors = site_posteriors(run, cfg, None, model._fc.in_features)
        notes.append("a site that never trained: no calibration, no personalised head, prior = π_train")
        if cfg.bn_mode == "fedbn":
            notes.append("bn-mode fedbn: BN affine parameters never left the sites, the pretrained ones are used")
    else:
        raise SiteModelError(f"bn must be 'site', 'pooled' or 'adabn'; got {bn!r}.")
    model.eval()
    return SiteModel(cfg, model, posteriors, run, label, site, notes)
