"""The model card: what a site's model is, how its inputs must be made, and how its outputs are read.

`model-card.json` travels with every prediction and every exported model, and stays at the
site. An exported graph (`fedrad.client.export`) holds the network only; the card holds the rest,
exactly enough to rebuild the preprocessing (`preprocessor_from_card`, checked against the
recorded repr) and the corrections (`posteriors_from_card`) without the run folder.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.client.cache import cache_folder
from fedrad.client.calibration import BCTS
from fedrad.client.reference import site_intensity
from fedrad.client.site_model import HEAD_FILE, Posteriors, SiteModel, SiteModelError
from fedrad.common.config import RunConfig
from fedrad.common.harmonize import IntensityMatch
from fedrad.common.preprocess import CT_WINDOWS, Preprocessor
from fedrad.common.version import __version__

CARD_FILE = "model-card.json"
FORMAT = "fedrad model card v1"


def _own_histogram(work: Path) -> np.ndarray | None:
    """The site's HU histogram as its run kept it (`<work>/cache/intensity-*.npz`, newest first)."""
    for path in sorted(cache_folder(work).glob("intensity-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            with np.load(path, allow_pickle=False) as f:
                counts = f["counts"].astype(np.int64)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            continue
        if counts.sum() > 0:
            return counts
    return None


def intensity_map(cfg: RunConfig, run_folder: Path, work: Path | None, data_dir: Path | None,
                  site: str = "site") -> IntensityMatch | None:
    """The site's harmonisation map for a run with `harmonize` on, else None.

    A site that trained refits the map of its run: its own kept histogram onto the run's
    reference (`reference.npz`). A site that never trained fits its own: the histogram of the
    folder it predicts on.
    """
    if cfg.harmonize == "off":
        return None
    ref_path = Path(run_folder) / "reference.npz"
    if not ref_path.is_file():
        raise SiteModelError(f"run {run_folder} used harmonize = '{cfg.harmonize}' but has no reference.npz.")
    with np.load(ref_path, allow_pickle=False) as f:
        reference = f["reference_counts"].astype(np.int64)
    own = _own_histogram(work) if work is not None else None
    if own is None:
        if data_dir is None:
            raise SiteModelError(f"harmonize = '{cfg.harmonize}': the site's map needs its own HU histogram, kept in "
                                 "its work folder's cache or read from --data; give --data.")
        own = site_intensity(data_dir, cfg).counts
    return IntensityMatch.fit(own, reference, method=cfg.harmonize, split_hu=cfg.harmonize_split_hu,
                              site=site)


def preprocessing_of(cfg: RunConfig, preprocessor: Preprocessor) -> dict[str, Any]:
    """JSON-ready preprocessing: everything `preprocessor_from_card` needs, and the repr to check it by."""
    match = preprocessor.intensity_map
    return {
        "spacing_mm": cfg.spacing_mm, "fov_mm": cfg.fov_mm, "input_px": preprocessor.size,
        "slice_mode": preprocessor.slice_mode, "slab_mm": preprocessor.slab_mm,  # series rows: how planes are cut
        "resample": "linear, square field of view centred on the lesion (roi_x, roi_y; image centre without)",
        "ct_windows_level_width_hu": [list(w) for w in CT_WINDOWS],
        "non_ct": "per-image robust scaling (1st-99th percentile) to 3 channels",
        "backbone_normalisation": repr(preprocessor.normalize),
        "harmonize": cfg.harmonize,
        "harmonisation_map": None if not isinstance(match, IntensityMatch) else {
            "method": match.method, "source_hu": match.source_hu.tolist(), "target_hu": match.target_hu.tolist()},
        "input": {"layout": "NCHW", "dtype": "float32", "shape": [None, 3, preprocessor.size, preprocessor.size]},
        "repr": repr(preprocessor),
    }


def build_card(site: SiteModel, preprocessor: Preprocessor, *, threshold: float, decide_on: str,
               model_sha256: str) -> dict[str, Any]:
    """The model card of `site` scored through `preprocessor`."""
    cfg = site.cfg
    return {
        "format": FORMAT, "fedrad_version": __version__,
        "run_id": site.run.run_id, "run_folder": str(site.run.folder), "rounds": site.run.server_round,
        "strategy": f"{cfg.bn_mode}, freeze-blocks={cfg.freeze_blocks}", "bn_mode": cfg.bn_mode,
        "freeze_blocks": cfg.freeze_blocks, "site": site.site, "batchnorm": site.bn,
        "preprocessing": preprocessing_of(cfg, preprocessor),
        "outputs": {
            "probability": "P(malignant) of the federation's decision layer under π_train: softmax(z + τ·log π_train)",
            "probability_corrected": "calibrated (BCTS), re-weighted to the site's prior",
            "probability_personalised": "the site's own decision layer (empty without one)",
        },
        **site.posteriors.describe(),
        "decision": {"threshold": threshold, "on": decide_on},
        "model_sha256": model_sha256,
        "notes": site.notes,
        "run_config": cfg.to_run_config(),
    }


def write_card(card: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / CARD_FILE
    path.write_text(json.dumps(card, indent=2))
    return path


def read_card(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an exported model folder holds the model and its {CARD_FILE} "
                                "(fedrad export).")
    card = json.loads(path.read_text())
    if card.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} (format {card.get('format')!r}).")
    return card


def preprocessor_from_card(card: dict[str, Any]) -> Preprocessor:
    """The exact preprocessing the card describes; refused if it does not rebuild to the same repr."""
    pre = card["preprocessing"]
    hmap = pre.get("harmonisation_map")
    match = None if hmap is None else IntensityMatch(np.asarray(hmap["source_hu"]), np.asarray(hmap["target_hu"]),
                                                     method=hmap["method"])
    windows = [tuple(w) for w in pre["ct_windows_level_width_hu"]]
    preprocessor = Preprocessor(spacing_mm=pre["spacing_mm"], fov_mm=pre["fov_mm"], ct_windows=windows,
                                slice_mode=pre.get("slice_mode", "largest"), slab_mm=pre.get("slab_mm", 5.0),
                                intensity_map=match)
    if repr(preprocessor) != pre["repr"]:
        raise ValueError(f"the model card's preprocessing rebuilds to {preprocessor!r}, not the recorded "
                         f"{pre['repr']}; this fedrad ({__version__}) preprocesses differently from the one that "
                         f"exported the model ({card.get('fedrad_version')}).")
    return preprocessor


def posteriors_from_card(card: dict[str, Any], folder: Path) -> Posteriors:
    """The corrections the card records (the personalised head from the exported folder)."""
    pt = float(card["prior_train"])
    out = Posteriors(prior_train=np.array([1 - pt, pt]), logit_adjust=float(card["logit_adjust"]))
    cal = card.get("calibration")
    if cal is not None:
        out.calibration = BCTS(float(cal["temperature"]), np.asarray(cal["bias"], np.float64))
    prior = card["prior"]["p_malignant"]
    if prior is not None:
        out.prior_site, out.prior_source = np.array([1 - prior, prior]), card["prior"]["source"]
    if card.get("personalised_head"):
        path = Path(folder) / HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the model card says the site has a personalised head.")
        with np.load(path, allow_pickle=False) as f:
            out.head = (np.asarray(f["weight"], np.float64), np.asarray(f["bias"], np.float64))
    return out
