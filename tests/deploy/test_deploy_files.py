"""deploy/ files that cannot run here (no init system, no container engine) are still checked:
their fedrad command lines parse with fedrad's own parser, they keep TLS and telemetry settings,
and they never mount the CA key or other sites' keys."""

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from fedrad.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


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


def pins(lines) -> dict[str, str]:
    """{normalised name: version} of `name==version` requirement lines (extras dropped)."""
    out = {}
    for line in lines:
        if (m := re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)\s*", line)):
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return out


def test_every_dependency_is_pinned_and_the_constraints_agree():
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    direct = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    assert all(pins([d]) for d in direct), f"unpinned: {[d for d in direct if not pins([d])]}"
    constrained = pins((ROOT / "constraints.txt").read_text().splitlines())
    assert len(constrained) > 50  # the transitive closure, not only our own list
    differ = {name: (version, constrained.get(name)) for name, version in pins(direct).items()
              if constrained.get(name) != version}
    assert not differ, f"pyproject.toml pin vs constraints.txt: {differ}; run `make constraints`"
    for installer in (ROOT / "Makefile", DEPLOY / "site" / "Containerfile", DEPLOY / "coordinator" / "Containerfile"):
        text = installer.read_text()
        assert re.search(r"-c constraints\.txt -e '?\.", text), f"{installer} installs fedrad without constraints.txt"


def test_the_gpl_decoder_is_opt_in_and_the_tests_still_get_it():
    """pylibjpeg-libjpeg is GPL-3.0 (fedrad is Apache-2.0): not a default dependency, the extra gpl-jpeg, in dev."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    assert "pylibjpeg-libjpeg" not in pins(project["dependencies"])
    assert set(pins(extras["gpl-jpeg"])) == {"pylibjpeg-libjpeg"}
    assert pins(extras["gpl-jpeg"]).items() <= pins(extras["dev"]).items()
    assert "python-gdcm" in pins(project["dependencies"])  # BSD/Apache-2.0: JPEG baseline/lossless by default
