"""The coordinator's checkpoint: everything needed to go on after the last finished round.

Written after every round into `<out-dir>/state/checkpoint.npz`, atomically (a temporary
file in the same folder, fsync, `os.replace`): a coordinator killed at any moment leaves
either the previous round's checkpoint or this one, never a torn file. One file holds the
global shared weights (`arrays/<key>`) and a JSON document (`meta`) with the round, the
run config, the federation id, every site's metrics and bytes so far, and the rejected and
failed replies. Loading needs no pickle.

A checkpoint belongs to one experiment: its fingerprint covers every run-config key that
changes what is trained. Operational keys (rounds, timeouts, min-sites, folders) are left
out, so a restarted run may ask for more rounds or a longer timeout and still resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedrad.common.records import from_numpy, to_numpy
from fedrad.server.strategy import FedRad, SiteLog

log = logging.getLogger("fedrad.coordinator")

FORMAT = 1
ARRAY_PREFIX = "arrays/"
# Keys that do not change what is trained: a checkpoint resumes across changes of these.
OPERATIONAL_KEYS = frozenset({"num-server-rounds", "round-timeout", "rejoin-wait", "min-sites", "data-dir", "out-dir",
                              "work-dir"})


def checkpoint_path(out_dir: Path | str) -> Path:
    return Path(out_dir) / "state" / "checkpoint.npz"


def fingerprint(run_config: dict[str, Any]) -> str:
    """sha256 of the run-config keys that define the experiment (canonical JSON)."""
    defining = {k: v for k, v in sorted(run_config.items()) if k not in OPERATIONAL_KEYS}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """The state after `round` finished rounds."""

    round: int
    fingerprint: str
    federation_id: str
    run_config: dict[str, Any]
    arrays: dict[str, np.ndarray]
    sites: dict[str, SiteLog] = field(default_factory=dict)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    wall_seconds: float = 0.0
    round_seconds: dict[int, float] = field(default_factory=dict)  # coordinator wall time of each round


def _site_to_json(site: SiteLog) -> dict[str, Any]:
    return {"name": site.name, "train": site.train, "evaluate": site.evaluate, "bytes_sent": site.bytes_sent}


def _site_from_json(doc: dict[str, Any]) -> SiteLog:
    rounds = lambda d: {int(r): v for r, v in d.items()}  # noqa: E731  (JSON keys are strings)
    return SiteLog(doc["name"], train=rounds(doc["train"]), evaluate=rounds(doc["evaluate"]),
                   bytes_sent={int(r): int(v) for r, v in doc["bytes_sent"].items()})


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    meta = {"format": FORMAT, "round": ckpt.round, "fingerprint": ckpt.fingerprint,
            "federation_id": ckpt.federation_id, "run_config": ckpt.run_config,
            "sites": {n: _site_to_json(s) for n, s in ckpt.sites.items()},
            "rejected": [list(e) for e in ckpt.rejected], "failed": [list(e) for e in ckpt.failed],
            "wall_seconds": ckpt.wall_seconds, "round_seconds": ckpt.round_seconds, "keys": list(ckpt.arrays)}
    text = json.dumps(meta, allow_nan=True)  # an undefined metric (AUC of a one-class split) stays NaN
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.array(text), **{ARRAY_PREFIX + k: v for k, v in ckpt.arrays.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at `path`, or None when there is none. A corrupt file raises, naming it."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[ARRAY_PREFIX + k] for k in meta["keys"]}
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"Checkpoint {path} cannot be read ({err}); move it away to start this run from round 1."
                         ) from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"Checkpoint {path} has format {meta.get('format')}, this fedrad writes {FORMAT}; "
                         "move it away to start from round 1.")
    sites = {name: _site_from_json(doc) for name, doc in meta["sites"].items()}
    return Checkpoint(round=int(meta["round"]), fingerprint=meta["fingerprint"],
                      federation_id=meta["federation_id"], run_config=meta["run_config"], arrays=arrays,
                      sites=sites, rejected=[tuple(e) for e in meta["rejected"]],  # type: ignore[misc]
                      failed=[tuple(e) for e in meta["failed"]], wall_seconds=float(meta["wall_seconds"]),
                      round_seconds={int(r): float(s) for r, s in meta.get("round_seconds", {}).items()})


def resume_point(path: Path, run_config: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint to resume from, None to start at round 1, or a ValueError on a mismatch.

    A checkpoint of another experiment (different fingerprint) is never resumed and never
    overwritten silently: the error names the differing keys and the two ways out.
    """
    ckpt = load_checkpoint(path)
    if ckpt is None:
        return None
    if ckpt.fingerprint != fingerprint(run_config):
        differ = sorted(k for k in set(run_config) | set(ckpt.run_config) if k not in OPERATIONAL_KEYS
                        and run_config.get(k) != ckpt.run_config.get(k))
        raise ValueError(f"Checkpoint {path} belongs to another experiment (run config differs in {differ}); use "
                         "another out-dir for this run, or move the checkpoint away to start over.")
    return ckpt


class Checkpointer:
    """One run's checkpoint: restore the strategy from it on start, save after every round."""

    def __init__(self, path: Path, run_config: dict[str, Any]) -> None:
        self.path = path
        self.run_config = run_config
        self.found = resume_point(path, run_config)
        self.federation_id = self.found.federation_id if self.found else uuid.uuid4().hex[:16]
        self.done = self.found.round if self.found else 0  # rounds finished before this session
        self.previous_seconds = self.found.wall_seconds if self.found else 0.0
        self.round_seconds = dict(self.found.round_seconds) if self.found else {}
        self.started = self._mark = time.perf_counter()

    def restore(self, strategy: FedRad, initial: ArrayRecord) -> ArrayRecord:
        """The global arrays to go on from (the checkpoint's, else `initial`); refills the strategy's logs."""
        if self.found is None:
            return initial
        expected = {k: tuple(a.shape) for k, a in to_numpy(initial).items()}
        if {k: tuple(a.shape) for k, a in self.found.arrays.items()} != expected:
            raise ValueError(f"Checkpoint {self.path} holds other shared arrays than this model has; it was written "
                             "by another fedrad version. Use another out-dir or move the checkpoint away.")
        strategy.sites = self.found.sites
        strategy.rejected = list(self.found.rejected)
        strategy.failed = list(self.found.failed)
        log.info("resuming from %s: %d round(s) done, going on at round %d", self.path, self.done, self.done + 1)
        return from_numpy(self.found.arrays)

    def wall_seconds(self) -> float:
        """Coordinator time over all sessions of this run."""
        return self.previous_seconds + time.perf_counter() - self.started

    def save(self, server_round: int, arrays: ArrayRecord, strategy: FedRad) -> None:
        now = time.perf_counter()
        self.round_seconds[server_round] = round(now - self._mark, 2)  # since the previous round (or the start)
        self._mark = now
        save_checkpoint(self.path, Checkpoint(
            round=server_round, fingerprint=fingerprint(self.run_config), federation_id=self.federation_id,
            run_config=self.run_config, arrays=to_numpy(arrays), sites=strategy.sites, rejected=strategy.rejected,
            failed=strategy.failed, wall_seconds=self.wall_seconds(), round_seconds=self.round_seconds))
        log.info("round %d checkpointed to %s", server_round, self.path)
