"""deploy/ files that cannot run here (no init system, no container engine) are still checked:
their fedrad command lines parse with fedrad's own parser, they keep TLS and telemetry settings,
and they never mount the CA key or other sites' keys."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from common.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def fedrad_args(command_line: list[str]) -> list[str]:
    """The arguments after the `fedrad` program in a command line."""
    i = next(i for i, word in enumerate(command_line) if word.endswith("fedrad"))
    return command_line[i + 1:]


@pytest.mark.parametrize("unit, command", [("fedrad-coordinator.service", "coordinator"),
                                           ("fedrad-site.service", "site")])
def test_systemd_units_run_a_valid_fedrad_command_without_telemetry(unit, command):
    text = (DEPLOY / "systemd" / unit).read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.+)$", text, re.M)
    args = build_parser().parse_args(fedrad_args(shlex.split(exec_start)))
    assert args.command == command
    assert "FLWR_TELEMETRY_ENABLED=0" in text and "FLWR_DISABLE_UPDATE_CHECK=1" in text
    assert "--insecure" not in text and re.search(r"^User=fedrad$", text, re.M)


@pytest.mark.parametrize("role, command", [("coordinator", "coordinator"), ("site", "site")])
def test_containerfiles_run_a_valid_fedrad_command_as_a_user(role, command):
    text = (DEPLOY / role / "Containerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.+\])$", text, re.M).group(1))
    cmd = re.search(r"^CMD (\[.+\])$", text, re.M)
    args = build_parser().parse_args(fedrad_args(entry + (json.loads(cmd.group(1)) if cmd else [])))
    assert args.command == command
    assert re.search(r"^USER fedrad$", text, re.M) and "FLWR_TELEMETRY_ENABLED=0" in text


def test_compose_files_mount_only_what_each_role_needs():
    yaml = pytest.importorskip("yaml")
    coordinator = yaml.safe_load((DEPLOY / "coordinator" / "compose.yaml").read_text())["services"]["coordinator"]
    mounts = coordinator["volumes"]
    assert all(m.endswith(":ro") for m in mounts if "CERTS" in m)
    assert not [m for m in mounts if re.search(r"/(ca|sites)(:|/)", m.split(":")[0])]  # never the CA key or bundles
    site = yaml.safe_load((DEPLOY / "site" / "compose.yaml").read_text())["services"]["site"]
    assert "ports" not in site  # a site only dials out
    assert [m for m in site["volumes"] if m.startswith("${BUNDLE")][0].endswith(":ro")
    assert [m for m in site["volumes"] if m.startswith("${DATA")][0].endswith(":ro")


def test_local_demo_is_valid_bash_and_stops_only_its_own_pids():
    script = DEPLOY / "local-demo.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "trap cleanup EXIT" in text
    assert not re.search(r"\b(pkill|killall)\b", text)
