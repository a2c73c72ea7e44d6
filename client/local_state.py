"""A site's own tensors (its BatchNorm) on its own disk, one file per finished round.

Flower's `context.state` lives in the SuperNode's memory: a restarted site daemon, or a
coordinator that restarts and resubmits the run (a new run id), would start over with
pretrained BN. So after each training round the site also writes its local tensors to

    <work-dir>/local-state/<federation-id>/round-0003.npz

atomically, and keeps the last `keep` rounds. Training in round r starts from the newest
file before r; evaluating round r uses the newest up to r. Keeping a file per round makes
a resumed round exact: a coordinator that crashed mid-round r and redoes it sends the
weights of round r-1, and the site pairs them with its BN of round r-1, not of the lost r.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

ROUND_FILE = re.compile(r"^round-(\d+)\.npz$")
SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")


class LocalStateStore:
    """Per-round files of one site and one federation."""

    def __init__(self, work_dir: Path, federation_id: str, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}.")
        self.folder = Path(work_dir) / "local-state" / SAFE_ID.sub("_", federation_id)
        self.keep = keep

    def rounds(self) -> list[int]:
        """Rounds with a stored state, ascending."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := ROUND_FILE.match(p.name)))

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:04d}.npz"

    def save(self, server_round: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Write this round's tensors (tmp file + fsync + rename), then drop all but the newest `keep`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(server_round)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: v.detach().cpu().numpy() for k, v in tensors.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        for old in self.rounds()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        return target

    def latest(self, up_to: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(round, tensors) of the newest stored round <= `up_to`, or None (start from pretrained BN)."""
        candidates = [r for r in self.rounds() if r <= up_to]
        if not candidates:
            return None
        with np.load(self.path(candidates[-1]), allow_pickle=False) as data:
            return candidates[-1], {k: torch.from_numpy(np.array(data[k])) for k in data.files}
