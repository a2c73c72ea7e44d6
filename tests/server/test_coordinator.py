"""The coordinator's commands: the SuperLink's flags, the CLI connection, registration, submission."""

import json
import subprocess
import sys
import tomllib

import pytest

from fedrad.server import coordinator
from fedrad.server.coordinator import register_sites, submit_command, superlink_command, write_connection
from fedrad.server.provision import CertsLayout, provision


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    provision(root, sites=["a", "b"])
    return root


def test_superlink_runs_tls_with_node_auth_and_no_runtime_installs(certs, tmp_path):
    argv = superlink_command(CertsLayout(certs), tmp_path / "state", host="0.0.0.0", port=9443)
    assert argv[:3] == [sys.executable, "-m", "fedrad.server.superlink_sqlite"]  # Flower's, longer SQLite wait
    flags = dict(zip(argv[1::1], argv[2::1]))
    assert flags["--ssl-certfile"] == str(certs / "coordinator" / "server.pem")
    assert flags["--ssl-keyfile"] == str(certs / "coordinator" / "server.key")
    assert flags["--ssl-ca-certfile"] == str(certs / "coordinator" / "ca.crt")
    assert flags["--database"] == str(tmp_path / "state" / "superlink.db")
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert "--insecure" not in argv and flags["--host"] == "0.0.0.0" and flags["--port"] == "9443"


def test_superlink_without_provisioning_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="fedrad provision"):
        superlink_command(CertsLayout(tmp_path), tmp_path)


def test_connection_is_added_and_updated_without_touching_others(tmp_path, monkeypatch, certs):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n\n'
                                          '[superlink.local]\noptions.num-supernodes = 4\n')
    write_connection("127.0.0.1:8000", certs / "coordinator" / "ca.crt")
    write_connection("coord:9443", certs / "coordinator" / "ca.crt")
    doc = tomllib.loads((tmp_path / "config.toml").read_text())
    assert doc["superlink"]["default"] == "local" and doc["superlink"]["local"] == {"options": {"num-supernodes": 4}}
    assert doc["superlink"]["fedrad"] == {"address": "coord:9443",
                                          "root-certificates": str(certs / "coordinator" / "ca.crt")}


def test_submit_sends_this_app_with_an_absolute_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = submit_command(tmp_path.joinpath("runs", "x").relative_to(tmp_path), overrides=["lr-max=0.01"], rounds=3)
    assert argv[1:2] == ["run"] and argv[3] == "fedrad"
    assert argv[-1] == f"lr-max=0.01 out-dir='{tmp_path / 'runs' / 'x'}' num-server-rounds=3"
    with pytest.raises(FileNotFoundError, match="pyproject.toml"):
        submit_command(tmp_path, app_dir=tmp_path)


def test_registration_is_idempotent_and_a_rotated_key_replaces_the_old_node(tmp_path, monkeypatch):
    certs = tmp_path / "certs"
    provision(certs, sites=["a"])
    calls, known_keys = [], {}

    def fake_flwr(args, *, check=False):  # a SuperLink that remembers keys, like the real one
        calls.append(args[:2])
        if args[1] == "register":
            key = open(args[2]).read()
            if key in known_keys:
                out = {"success": False, "error-message": "[code: 23] Public key already in use."}
            else:
                known_keys[key] = 100 + len(known_keys)
                out = {"success": True, "node-id": known_keys[key]}
            return subprocess.CompletedProcess(args, 0, json.dumps(out), "")
        return subprocess.CompletedProcess(args, 0, "{}", "")

    monkeypatch.setattr(coordinator, "run_flwr", fake_flwr)
    layout = CertsLayout(certs)
    assert [(r.site, r.node_id, r.action) for r in register_sites(layout)] == [("a", 100, "registered")]
    assert [(r.node_id, r.action) for r in register_sites(layout)] == [(100, "already registered")]
    provision(certs, rotate=["a"])
    assert [(r.node_id, r.action) for r in register_sites(layout)] == [(101, "re-registered (key rotated)")]
    assert ["supernode", "unregister"] in calls
    with pytest.raises(FileNotFoundError, match="provision site zz first"):
        register_sites(layout, ["zz"])
