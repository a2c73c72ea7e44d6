"""The global model as the coordinator saves it after every round: shared weights + BN registry.

Two files in the run's out-dir, rewritten atomically each round (write to a temporary name,
then rename, so a crash never leaves half a file):

- ``global.npz`` (numpy, no pickle): ``shared/<key>`` the averaged shared weights,
  ``bn-pooled/<layer>.running_mean|running_var`` the pooled BN statistics, and
  ``bn-site/<site>/<layer>.running_mean|running_var`` each site's latest report;
- ``global.json``: round, run config, the keys of each group, and per site the round and
  image count of its BN report.

A site never seen in training builds the model from ``config``, loads ``shared`` and either
the pooled BN or its own AdaBN estimate (`fedrad.client.unseen`). The coordinator writes these
files beside its checkpoint (`fedrad.server.checkpoint`) at the end of every round, and on a
restart refills its BN registry from them (`restore_registry`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.server.bn_registry import BNRegistry, SiteBNStats

log = logging.getLogger("fedrad.coordinator")
NPZ, JSON = "global.npz", "global.json"
SHARED, POOLED, SITE = "shared/", "bn-pooled/", "bn-site/"


@dataclass
class GlobalModel:
    """What `load_global_model` returns."""

    server_round: int
    config: dict[str, Any]  # kebab-case run config (RunConfig.from_run_config builds it)
    shared: dict[str, np.ndarray]
    bn_pooled: dict[str, np.ndarray]
    registry: BNRegistry = field(default_factory=BNRegistry)
    run_id: str = ""  # the experiment's federation id: names each site's own state of this run

    def site_weights(self) -> dict[str, np.ndarray]:
        """What a site never seen in training loads: the shared weights and the pooled BN statistics."""
        return {**self.shared, **self.bn_pooled}


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def save_global_model(out_dir: Path, *, server_round: int, shared: Mapping[str, np.ndarray],
                      registry: BNRegistry, config: Mapping[str, Any], run_id: str = "") -> Path:
    """Write global.npz + global.json into `out_dir`; return the npz path.

    `run_id` (the federation id) lets a site's `fedrad predict` check that its own work
    folder (BN, calibration, personalised head) belongs to this run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pooled = registry.pooled()
    arrays = {SHARED + k: np.asarray(v) for k, v in shared.items()}
    arrays.update({POOLED + k: v for k, v in pooled.items()})
    for name, entry in registry.sites.items():
        arrays.update({f"{SITE}{name}/{k}": np.asarray(v) for k, v in entry.stats.items()})
    _atomic_write(out_dir / NPZ, lambda fh: np.savez(fh, **arrays))
    meta = {
        "format": "fedrad global model v1: global.npz holds shared/<key>, bn-pooled/<key>, bn-site/<site>/<key>",
        "round": server_round,
        "run_id": run_id,
        "config": dict(config),
        "shared_keys": list(shared),
        "bn_pooled_keys": list(pooled),
        "bn_sites": registry.summary(),
    }
    _atomic_write(out_dir / JSON, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return out_dir / NPZ


def load_global_model(out_dir: Path) -> GlobalModel:
    """Read what `save_global_model` wrote; errors name the missing file."""
    out_dir = Path(out_dir)
    for name in (NPZ, JSON):
        if not (out_dir / name).is_file():
            raise FileNotFoundError(f"{out_dir / name} not found: a federated run writes it after its first round "
                                    "(fedrad simulate / compare --out DIR).")
    meta = json.loads((out_dir / JSON).read_text())
    with np.load(out_dir / NPZ) as npz:
        arrays = {k: npz[k] for k in npz.files}
    registry = BNRegistry()
    for entry in meta["bn_sites"]:
        prefix = f"{SITE}{entry['site']}/"
        stats = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        registry.sites[entry["site"]] = SiteBNStats(entry["site"], int(entry["round"]), int(entry["count"]), stats)
    return GlobalModel(
        server_round=int(meta["round"]), config=meta["config"],
        shared={k[len(SHARED):]: v for k, v in arrays.items() if k.startswith(SHARED)},
        bn_pooled={k[len(POOLED):]: v for k, v in arrays.items() if k.startswith(POOLED)},
        registry=registry, run_id=str(meta.get("run_id", "")),
    )


def restore_registry(registry: BNRegistry, out_dir: Path, done_rounds: int) -> None:
    """After a restart at round `done_rounds` + 1: refill `registry` from the saved global model.

    The global model is written right after the checkpoint, so after a crash between the
    two it may be a round older: each site's entry then keeps its older statistics until
    its next report, which is what the registry holds anyway (the latest report per site).
    """
    if done_rounds == 0 or not (Path(out_dir) / JSON).is_file():
        return
    glob = load_global_model(out_dir)
    if glob.server_round > done_rounds:
        log.warning("global model in %s is from round %d, after the checkpoint's round %d: BN registry not restored",
                    out_dir, glob.server_round, done_rounds)
        return
    registry.sites.update(glob.registry.sites)
    log.info("BN registry restored from %s: %d site(s) as of round %d", out_dir / JSON, len(registry.sites),
             glob.server_round)
