"""Leave-one-site-out: federate without one site, then serve it as a hospital never seen in training.

The federation runs on the other sites (a folder of links to their folders, so nothing is
copied); its global model (`global.npz`) carries the shared weights and the BN registry.
The held-out site then evaluates that model on its test split twice: with the pooled BN
statistics of the training sites, and with AdaBN (its own images, forward passes only).

The default bn-mode is silobn: its global model includes the BN affine parameters, so the
only thing the new site lacks is statistics, which is the question asked. (In fedbn the
affine parameters never leave the sites and the new site would get the pretrained ones.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrad.client.dataset import SiteData
from fedrad.client.unseen import evaluate_unseen
from fedrad.common.config import RunConfig
from fedrad.common.sites import discover_sites
from fedrad.server.global_model import load_global_model


def federation_without(data_dir: Path, held_out: str, folder: Path) -> Path:
    """`folder` with a link to every site folder of `data_dir` except `held_out`; returns `folder`."""
    sites = discover_sites(data_dir)
    if held_out not in {s.name for s in sites}:
        raise ValueError(f"leave-one-site-out: no site folder {held_out!r} in {data_dir} "
                         f"(sites: {[s.name for s in sites]}).")
    if len(sites) < 2:
        raise ValueError(f"leave-one-site-out needs at least 2 sites in {data_dir}; found {len(sites)}.")
    folder.mkdir(parents=True, exist_ok=True)
    for site in sites:
        link = folder / site.name
        if site.name != held_out and not link.exists():
            os.symlink(site.resolve(), link, target_is_directory=True)
    return folder


def run_leave_one_out(cfg: RunConfig, held_out: SiteData, run_federation: Callable[[RunConfig], dict[str, Any]],
                      work: Path) -> dict[str, Any]:
    """Federate on every site but `held_out` (into `work`), then evaluate it with pooled BN and with AdaBN.

    `run_federation(cfg)` runs a federation on `cfg.data_dir` and writes into `cfg.out_dir`
    (in-process or Flower's Simulation Engine).
    """
    start = time.perf_counter()
    others = federation_without(Path(cfg.data_dir), held_out.name, work / "data")  # not "sites": site work dirs
    n_others = len(discover_sites(others))
    fed_cfg = cfg.replace(data_dir=str(others), out_dir=str(work), min_sites=min(cfg.min_sites, n_others),
                          work_dir="")
    run_federation(fed_cfg)
    glob = load_global_model(work)
    pooled = evaluate_unseen(glob.config, glob.site_weights(), held_out, bn="pooled")
    adabn = evaluate_unseen(glob.config, glob.site_weights(), held_out, bn="adabn")
    return {"site": held_out.name, "trained_on": sorted(e.site for e in glob.registry.sites.values()),
            "pooled_bn": pooled, "adabn": adabn, "wall_seconds": time.perf_counter() - start}
