"""Faults with real processes: a site lost mid-round, a coordinator killed and restarted."""

from __future__ import annotations

import json
import time

import pytest

from fedrad.server.checkpoint import checkpoint_path, load_checkpoint
from tests.deploy.conftest import SITES
from tests.deploy.deployment import FAST_RUN
from tests.deploy.harness import wait_for

pytestmark = pytest.mark.slow


def checkpoint_round(out) -> int:
    try:
        ckpt = load_checkpoint(checkpoint_path(out))
    except ValueError:  # not possible with atomic writes; keep polling rather than fail on a race
        return 0
    return 0 if ckpt is None else ckpt.round


def start_sites(deployment, sites=SITES, extra: tuple[str, ...] = ()) -> None:
    deployment.start_coordinator()
    deployment.register(*sites)
    for site in sites:
        deployment.start_site(site, extra=extra)
    deployment.wait_online(len(sites))


@pytest.mark.parametrize("mode", [("--cold",), ("--warm", "--poll-interval", "0.25")], ids=["flower", "warm"])
def test_coordinator_killed_after_round_one_resumes_at_round_two(deployment, tmp_path, mode):
    sites = SITES[:2]  # two sites are enough here, and keep this test's CPU load down
    start_sites(deployment, sites, extra=mode)
    out = tmp_path / "out"
    run_config = FAST_RUN + " round-timeout=600.0"
    deployment.submit(out, run_config)
    everyone = [deployment.coordinator, *deployment.sites.values()]
    wait_for("round 1's checkpoint", lambda: checkpoint_round(out) >= 1, watch=everyone, poll=0.5)
    deployment.coordinator.kill()  # SIGKILL: no chance to clean up or write anything more
    after_one = load_checkpoint(checkpoint_path(out))
    assert after_one.round == 1 and not (out / "report.json").exists()

    deployment.start_coordinator()  # same state folder (registered sites), same port: the sites reconnect
    deployment.wait_online(len(sites))
    deployment.submit(out, run_config)
    wait_for("the resumed run's report", lambda: (out / "report.json").is_file(),
             watch=[deployment.coordinator, *deployment.sites.values()])

    final = load_checkpoint(checkpoint_path(out))
    assert final.round == 2 and final.federation_id == after_one.federation_id
    for site in sites:
        # round 1 is the one trained before the kill (its measured seconds prove it was not redone) ...
        assert final.sites[site].train[1] == after_one.sites[site].train[1]
        # round 1's evaluation rides in round 2's train message: sent after the restart, to the resumed run
        assert not after_one.sites[site].evaluate and set(final.sites[site].evaluate) == {1, 2}
        # ... and round 2 was trained after the restart
        assert set(final.sites[site].train) == {1, 2}
    report = json.loads((out / "report.json").read_text())
    assert all(s["rounds_trained"] == 2 for s in report["sites"])
    assert report["wall_seconds"] >= after_one.wall_seconds


def rejoin(deployment, site: str, extra: tuple[str, ...] = ()) -> None:
    """Restart a crashed site the way systemd's Restart=always does, until the coordinator takes it back.

    After a crash the coordinator holds the site's old session for up to two missed
    heartbeats (~60 s) and refuses a second one with [code: 2004]; a graceful stop would
    not. Each refused attempt exits, and the next one follows after a short pause.
    """
    for attempt in range(60):
        proc = deployment.start_site(site, name=f"{site}-again-{attempt}", extra=extra)
        wait_for(f"{site} to connect or be refused", lambda: not proc.alive() or "SuperNode ID" in proc.log(),
                 watch=[deployment.coordinator], poll=0.5, limit=120)
        if proc.alive():
            return
        assert "[code: 2004]" in proc.log(), proc.log()  # refused only because the old session is still open
        time.sleep(2)
    raise AssertionError(f"{site} was not taken back after 60 attempts")


@pytest.mark.parametrize("mode", [("--cold",), ("--warm", "--poll-interval", "0.25")], ids=["flower", "warm"])
def test_a_site_killed_mid_round_leaves_the_round_to_the_others_and_is_waited_for(deployment, tmp_path, mode):
    start_sites(deployment, extra=mode)
    out = tmp_path / "out"
    # the timeout only bounds the wait for the lost site; the healthy ones answer well within it
    deployment.submit(out, FAST_RUN + " round-timeout=75.0 rejoin-wait=120.0")
    lost = deployment.sites["c"]
    healthy = [deployment.coordinator, deployment.sites["a"], deployment.sites["b"]]
    # (the queries before round 1 start a ClientApp too: wait for the train message itself)
    wait_for("site c to receive round 1's train message", lambda: "Receiving: train message" in lost.log(),
             watch=[*healthy, lost], poll=0.2)
    lost.kill()  # mid-round: it holds the round-1 train message and will never answer it
    # c stays away until round 1 has closed without it; round 2 then waits (rejoin-wait) for it to come back
    wait_for("round 1 to close without c", lambda: checkpoint_round(out) >= 1, watch=healthy, poll=0.5)
    rejoin(deployment, "c", extra=mode)  # the same site comes back (same key, same work folder)
    wait_for("the report", lambda: (out / "report.json").is_file(), watch=healthy)

    ckpt = load_checkpoint(checkpoint_path(out))
    assert ckpt.round == 2
    assert set(ckpt.sites["a"].train) == set(ckpt.sites["b"].train) == {1, 2}
    assert "c" in ckpt.sites, f"c missed round 2; failed replies {ckpt.failed}"
    assert set(ckpt.sites["c"].train) == {2}  # round 1 went on without c; round 2 waited for it
    lost_entries = [(r, site, why) for r, site, why in ckpt.failed if site == "c"]
    assert [(r, site) for r, site, _ in lost_entries] == [(1, "c")]  # round 1's loss is named, nothing after it
    # lost either way: no reply before round-timeout, or the SuperLink's "Node Unavailable"
    assert "no train reply within round-timeout" in lost_entries[0][2] or "train: Error: Node Unavailable" in \
        lost_entries[0][2]
    report = json.loads((out / "report.json").read_text())
    assert {s["name"]: s["rounds_trained"] for s in report["sites"]} == {"a": 2, "b": 2, "c": 1}
