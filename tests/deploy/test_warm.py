"""The warm site process with real daemons: one process serves every message; killed, it is replaced and
the site loses nothing (its BN per round and its caches are on its disk)."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from tests.deploy.deployment import FAST_RUN
from tests.deploy.harness import wait_for
from tests.deploy.test_faults import checkpoint_round, start_sites

pytestmark = pytest.mark.slow


def warm_pids(daemon) -> list[int]:
    """PIDs of the warm ClientApp processes under a site daemon."""
    out = []
    for proc in psutil.Process(daemon.pid).children(recursive=True):
        try:
            if "fedrad.client.warm_clientapp" in " ".join(proc.cmdline()):
                out.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_killed_warm_process_is_replaced_and_one_process_serves_every_message(deployment, tmp_path):
    sites = ("a", "b")
    start_sites(deployment, sites, extra=("--warm", "--poll-interval", "0.25"))
    first = {s: warm_pids(deployment.sites[s]) for s in sites}
    assert all(len(p) == 1 for p in first.values()), first
    os.kill(first["a"][0], signal.SIGKILL)  # a crash: the daemon must replace it (SuperNode untouched)
    everyone = [deployment.coordinator, *deployment.sites.values()]
    wait_for("a's replacement", lambda: warm_pids(deployment.sites["a"]) not in ([], first["a"]), watch=everyone,
             poll=0.2)
    second = warm_pids(deployment.sites["a"])
    assert "exited" in deployment.sites["a"].log()

    out = tmp_path / "out"
    deployment.submit(out, FAST_RUN + " round-timeout=600.0")
    wait_for("the report", lambda: (out / "report.json").is_file(), watch=everyone)
    # the queries, both rounds' training and evaluation: one process per site, the same throughout
    assert warm_pids(deployment.sites["a"]) == second and warm_pids(deployment.sites["b"]) == first["b"]
    report = json.loads((out / "report.json").read_text())
    assert {s["name"]: s["rounds_trained"] for s in report["sites"]} == {"a": 2, "b": 2}
    assert report["failed_replies"] == [] and report["rejected_updates"] == []
    assert checkpoint_round(out) == 2
