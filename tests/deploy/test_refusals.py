"""The coordinator refuses what it must: a plaintext client, a key it never registered, no key at all."""

from __future__ import annotations

import pytest

from fedrad.common.flower_tools import flower_binary
from tests.deploy.harness import free_port, wait_for

pytestmark = pytest.mark.slow
GIVE_UP_S = 120.0  # a refused client exits within seconds; this only bounds a hang


def run_until_exit(deployment, name: str, argv: list[str]):
    proc = deployment._proc(name, argv, deployment.env())
    deployment.sites[name] = proc  # stopped by the fixture if it were still running
    wait_for(f"{name} to give up", lambda: not proc.alive(), watch=[deployment.coordinator], poll=0.5,
             limit=GIVE_UP_S)
    return proc


def test_a_plaintext_client_is_refused(deployment, site_data):
    deployment.start_coordinator()
    deployment.register("a")
    argv = [flower_binary("flower-supernode"), "--superlink", deployment.address, "--insecure", "--max-retries", "1",
            "--port", str(free_port()), "--node-config", f"data-dir='{site_data / 'a'}'"]
    proc = run_until_exit(deployment, "plaintext", argv)
    assert proc.popen.returncode != 0
    assert "could not establish a connection" in proc.log()
    assert deployment.online() == 0


def test_an_unregistered_key_and_a_missing_key_are_refused(deployment, pki, site_data):
    deployment.start_coordinator()
    deployment.register("a")  # 'rogue' has a valid bundle from the same CA, but was never registered
    rogue = deployment.start_site("a", bundle="rogue", name="rogue", extra=("--max-retries", "1"))
    wait_for("the rogue site to give up", lambda: not rogue.alive(), watch=[deployment.coordinator], poll=0.5,
             limit=GIVE_UP_S)
    assert rogue.popen.returncode != 0
    assert "[code: 2004] Failed to activate SuperNode" in rogue.log()

    argv = [flower_binary("flower-supernode"), "--superlink", deployment.address, "--root-certificates",
            str(pki / "sites" / "a" / "ca.crt"), "--max-retries", "1", "--port", str(free_port())]
    keyless = run_until_exit(deployment, "keyless", argv)
    assert keyless.popen.returncode != 0
    assert "[code: 2001]" in keyless.log()
    assert deployment.online() == 0
