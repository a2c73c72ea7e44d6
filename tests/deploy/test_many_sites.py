"""Sixteen site daemons on one machine (loopback, TLS, node authentication) complete five rounds.

Tiny sites (16 patients, 96 px, one local epoch) keep it short. Speed and memory are printed
(`pytest -s`) for BENCHMARKS.md, never asserted.
"""

from __future__ import annotations

import json
import time

import pytest

from fedrad.lab.deploy_bench import PeakMemory
from fedrad.lab.synth import SiteSpec, generate
from fedrad.server.checkpoint import checkpoint_path, load_checkpoint
from fedrad.server.provision import provision
from tests.deploy.deployment import FAST_RUN, Deployment
from tests.deploy.harness import wait_for
from tests.helpers import small_site_policy

pytestmark = pytest.mark.slow
N_SITES = 16
ROUNDS = 5


def test_sixteen_site_daemons_complete_five_rounds(tmp_path, request):
    names = [f"s{i:02d}" for i in range(N_SITES)]
    certs = tmp_path / "certs"
    provision(certs, sites=names)
    data = tmp_path / "data"
    kernels = ("smooth", "sharp")
    generate(data, sites=[SiteSpec(name=n, n_patients=16, prevalence=0.5, spacing_mm=0.7 + 0.02 * i, noise_hu=10,
                                   kernel=kernels[i % 2], hu_offset=5 * (i % 5), manufacturer="GE")
                          for i, n in enumerate(names)], seed=3, image_size=96)
    small_site_policy(data)
    dep = Deployment(tmp_path / "deploy", certs, data)
    (tmp_path / "deploy").mkdir()
    request.addfinalizer(dep.close)
    dep.start_coordinator()
    dep.register(*names)
    for name in names:
        dep.start_site(name, extra=("--poll-interval", "0.25"))
    dep.wait_online(N_SITES)

    out = tmp_path / "out"
    everyone = [dep.coordinator, *dep.sites.values()]
    with PeakMemory(lambda: [p.pid for p in dep.sites.values()]) as peak:
        start = time.perf_counter()
        dep.submit(out, FAST_RUN + " round-timeout=600.0", rounds=ROUNDS)
        wait_for("the report", lambda: (out / "report.json").is_file(), watch=everyone)
        wall = time.perf_counter() - start

    report = json.loads((out / "report.json").read_text())
    assert {s["name"]: s["rounds_trained"] for s in report["sites"]} == {n: ROUNDS for n in names}
    assert report["failed_replies"] == [] and report["rejected_updates"] == []
    ckpt = load_checkpoint(checkpoint_path(out))
    assert ckpt.round == ROUNDS and all(set(s.evaluate) == set(range(1, ROUNDS + 1)) for s in ckpt.sites.values())
    figures = {"sites": N_SITES, "rounds": ROUNDS, "round_seconds": [ckpt.round_seconds[r] for r in range(1, ROUNDS + 1)],
               "submit_to_report_seconds": round(wall, 1), "site_processes_peak_pss_mb": round(peak.pss / 2**20),
               "site_processes_peak_rss_mb": round(peak.rss / 2**20)}
    print("\n16-site deployment:", json.dumps(figures))
