"""End to end on loopback: SuperLink with TLS + node authentication, three SuperNodes, two rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrad.server.checkpoint import checkpoint_path, load_checkpoint
from tests.deploy.conftest import SITES
from tests.deploy.deployment import FAST_RUN
from tests.deploy.harness import wait_for

pytestmark = pytest.mark.slow


def test_two_rounds_over_tls_with_node_auth_write_report_and_checkpoint(deployment, tmp_path):
    deployment.start_coordinator()
    assert "a: registered" in deployment.register(*SITES)
    for site in SITES:
        deployment.start_site(site)
    deployment.wait_online(3)
    out = tmp_path / "out"
    deployment.submit(out, FAST_RUN + " round-timeout=600.0")
    wait_for("the report", lambda: (out / "report.json").is_file(),
             watch=[deployment.coordinator, *deployment.sites.values()])

    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["sites"]] == list(SITES)
    assert all(s["rounds_trained"] == 2 for s in report["sites"])
    assert report["rejected_updates"] == [] and report["failed_replies"] == []
    ckpt = load_checkpoint(checkpoint_path(out))
    assert ckpt.round == 2 and set(ckpt.sites) == set(SITES)
    assert all(set(s.train) == {1, 2} and set(s.evaluate) == {1, 2} for s in ckpt.sites.values())
    assert ckpt.run_config["out-dir"] == str(out)
    assert all(np.isfinite(a).all() for a in ckpt.arrays.values())
    # each site kept its own BN per round on its own disk, under the run's federation id
    for site in SITES:
        stored = sorted(p.name for p in (tmp_path / "work" / site / "local-state" / ckpt.federation_id).iterdir())
        assert stored == ["round-0001.npz", "round-0002.npz"]
