"""Sixteen site daemons on one machine (loopback, TLS, node authentication) complete five rounds.

A benchmark run by hand, not a CI test (`make test-bench`, marker `bench`: neither `make test`
nor `make test-slow` runs it): 16 warm sites hold about 9 GB and the run takes 10+ minutes on
2 cores. Tiny sites (16 patients, 96 px, one local epoch) keep it short. It checks that no
reply is lost (the SuperLink's SQLite lock wait, `fedrad.server.superlink_sqlite`, was the
cause before) and prints the figures for BENCHMARKS.md (`pytest -s`); speed is never asserted.
"""

from __future__ import annotations

import json
import time

import pytest

from fedrad.lab.deploy_bench import PeakMemory
from fedrad.lab.scale_bench import make_tiny_sites
from fedrad.server.checkpoint import checkpoint_path, load_checkpoint
from fedrad.server.provision import provision
from tests.deploy.deployment import FAST_RUN, Deployment
from tests.deploy.harness import wait_for

pytestmark = pytest.mark.bench
N_SITES = 16
ROUNDS = 5


def test_sixteen_site_daemons_complete_five_rounds(tmp_path, request):
    names = [f"s{i:03d}" for i in range(N_SITES)]
    certs = tmp_path / "certs"
    provision(certs, sites=names)
    data = make_tiny_sites(tmp_path / "data", N_SITES)
    dep = Deployment(tmp_path / "deploy", certs, data)
    (tmp_path / "deploy").mkdir()
    request.addfinalizer(dep.close)
    dep.start_coordinator()
    dep.register(*names)
    for name in names:
        dep.start_site(name, extra=("--warm", "--poll-interval", "0.25"))
    dep.wait_online(N_SITES)

    out = tmp_path / "out"
    everyone = [dep.coordinator, *dep.sites.values()]
    with PeakMemory(lambda: [p.pid for p in dep.sites.values()]) as peak:
        start = time.perf_counter()
        dep.submit(out, FAST_RUN + " round-timeout=600.0", rounds=ROUNDS)
        wait_for("the report", lambda: (out / "report.json").is_file(), watch=everyone, limit=3600)
        wall = time.perf_counter() - start

    report = json.loads((out / "report.json").read_text())
    assert report["failed_replies"] == [] and report["rejected_updates"] == []
    assert {s["name"]: s["rounds_trained"] for s in report["sites"]} == {n: ROUNDS for n in names}
    ckpt = load_checkpoint(checkpoint_path(out))
    assert ckpt.round == ROUNDS
    coordinator_log = dep.coordinator.log()
    assert "database is locked" not in coordinator_log
    figures = {"sites": N_SITES, "rounds": ROUNDS, "round_seconds": [ckpt.round_seconds[r] for r in range(1, ROUNDS + 1)],
               "submit_to_report_seconds": round(wall, 1), "site_processes_peak_pss_mb": round(peak.pss / 2**20),
               "site_processes_peak_rss_mb": round(peak.rss / 2**20)}
    print("\n16-site deployment:", json.dumps(figures))
