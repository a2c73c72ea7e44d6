"""The coordinator's deployment commands: start the SuperLink, admit the sites, submit a run.

Each builds the command line of a Flower program from a provisioned certificate folder
(`fedrad.server.provision.CertsLayout`) and runs it; nothing here speaks Flower's protocol.

- `superlink_command`: TLS with our CA's certificate, node authentication on, runtime
  dependency installation off (the sites and the coordinator run what is installed, never
  a `uv sync` from a registry), state in an SQLite database so registered sites survive a
  restart, with a longer lock wait than Flower's 5 s (`fedrad.server.superlink_sqlite`).
- `register_sites`: `flwr supernode register` for every site key, idempotent; a rotated key
  replaces the site's old registration.
- `submit_command`: `flwr run` of this project on the `fedrad` connection, which
  `write_connection` keeps in `$FLWR_HOME/config.toml` (where Flower 1.42 reads it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedrad.common.config import PROJECT_ROOT
from fedrad.common.flower_tools import flower_binary, flower_env, show, toml_literal
from fedrad.server.provision import CertsLayout, check_site_name
from fedrad.server.superlink_sqlite import DEFAULT_BUSY_TIMEOUT_S

CONNECTION = "fedrad"
log = logging.getLogger("fedrad.coordinator")


def require_coordinator_files(layout: CertsLayout) -> None:
    for path in (layout.coordinator_ca, layout.server_cert, layout.server_key):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `fedrad provision --certs {layout.root} --site NAME ...` "
                                    "first (see deploy/README.md).")


def superlink_command(layout: CertsLayout, state_dir: Path, *, host: str = "127.0.0.1", port: int = 8000,
                      busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> list[str]:
    """The `flower-superlink` command line of a secure coordinator.

    With `busy_timeout_s` > 0 Flower's SuperLink runs through `fedrad.server.superlink_sqlite`,
    which lets its SQLite requests wait that long for the write lock instead of Flower's fixed
    5 s (many sites replying at once lost replies to `database is locked`); 0 runs
    `flower-superlink` itself, unchanged.
    """
    require_coordinator_files(layout)
    launcher = [flower_binary("flower-superlink")]
    if busy_timeout_s:
        launcher = [sys.executable, "-m", "fedrad.server.superlink_sqlite", "--busy-timeout", f"{busy_timeout_s:g}",
                    "--"]
    return [*launcher,
            "--ssl-ca-certfile", str(layout.coordinator_ca.resolve()),
            "--ssl-certfile", str(layout.server_cert.resolve()),
            "--ssl-keyfile", str(layout.server_key.resolve()),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str((state_dir / "superlink.db").resolve()),
            "--host", host, "--port", str(port)]


def daemon_env(state_dir: Path) -> dict[str, str]:
    """The SuperLink's environment: its Flower home under the state folder unless one is set."""
    return flower_env({} if "FLWR_HOME" in os.environ else {"FLWR_HOME": str((state_dir / "flwr").resolve())})


def _flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def write_connection(address: str, ca_cert: Path, name: str = CONNECTION) -> Path:
    """Add or update `[superlink.<name>]` in `$FLWR_HOME/config.toml`, keeping every other entry.

    Written as plain TOML by hand (two string keys) so that nothing but this section changes.
    """
    path = _flwr_home() / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else ""
    existing = tomllib.loads(text) if text else {}
    section = f"[superlink.{name}]"
    body = f'{section}\naddress = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca_cert.resolve()))}\n'
    if name in existing.get("superlink", {}):
        lines, out, skipping = text.splitlines(keepends=True), [], False
        for line in lines:  # drop the old section (up to the next table header)
            if line.strip() == section:
                skipping = True
                continue
            if skipping and line.lstrip().startswith("["):
                skipping = False
            if not skipping:
                out.append(line)
        text = "".join(out)
    text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + body
    tomllib.loads(text)  # never leave a file Flower cannot read
    path.write_text(text)
    return path


def run_flwr(args: Sequence[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the `flwr` CLI quietly (no colours, wide lines) and capture its output."""
    env = flower_env({"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"})
    argv = [flower_binary("flwr"), *args]
    log.debug("running %s", show(argv))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{show(argv)}` failed ({proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class Registration:
    site: str
    node_id: int | None
    action: str  # registered, already registered, re-registered (rotated key)


def _registry_path(layout: CertsLayout) -> Path:
    return layout.root / "site-keys" / "registered.json"


def register_sites(layout: CertsLayout, sites: Sequence[str] = (), *, connection: str = CONNECTION
                   ) -> list[Registration]:
    """Register each site's public key with the SuperLink (all sites under `layout` by default).

    Always asks the SuperLink (its database is the truth: "already in use" means already
    registered). The node id Flower assigns is also noted in `site-keys/registered.json`
    with the key it belongs to: a site whose key was rotated (`fedrad provision --rotate`)
    has its old node unregistered before the new key is registered, so the old key stops
    working.
    """
    sites = list(sites) or layout.sites()
    if not sites:
        raise ValueError(f"No site keys under {layout.root / 'site-keys'}: run `fedrad provision --site NAME` first.")
    registry_path = _registry_path(layout)
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
    out = []
    for site in sites:
        pub = layout.site_pub(check_site_name(site))
        if not pub.is_file():
            raise FileNotFoundError(f"{pub} is missing: provision site {site} first "
                                    f"(`fedrad provision --site {site}`).")
        key = pub.read_text().strip()
        known = registry.get(site)
        action = "registered"
        if known and known["public_key"] != key:  # rotated: the old key must stop working first
            gone = run_flwr(["supernode", "unregister", str(known["node_id"]), connection])
            if gone.returncode != 0:
                log.warning("site %s: unregistering its old node %s failed (%s); registering the new key anyway",
                            site, known["node_id"], gone.stdout.strip()[-200:])
            action = "re-registered (key rotated)"
        proc = run_flwr(["supernode", "register", str(pub), connection, "--name", site, "--format", "json"])
        result = _json_of(proc)
        if not result.get("success"):
            message = str(result.get("error-message", proc.stderr)).strip()
            if "already in use" in message:  # this SuperLink knows the key already
                out.append(Registration(site, known["node_id"] if known else None, "already registered"))
                continue
            raise RuntimeError(f"Registering site {site} ({pub}) failed: {message}")
        node_id = int(result["node-id"])
        registry[site] = {"node_id": node_id, "public_key": key}
        registry_path.write_text(json.dumps(registry, indent=2))
        out.append(Registration(site, node_id, action))
    return out


def _json_of(proc: subprocess.CompletedProcess[str]) -> dict:
    text = proc.stdout
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {"success": False, "error-message": text + proc.stderr}


def submit_command(out_dir: Path, *, overrides: Sequence[str] = (), rounds: int | None = None, stream: bool = False,
                   app_dir: Path = PROJECT_ROOT, connection: str = CONNECTION) -> list[str]:
    """The `flwr run` command line: this project's app, the given run-config overrides, out-dir absolute.

    `out-dir` is a path on the coordinator machine (the ServerApp runs there); the report
    and the checkpoint of this experiment go there, and submitting again with the same
    out-dir and run config resumes after the last finished round.
    """
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir} holds no pyproject.toml; give --app the fedrad project folder (the Flower "
                                "app that is sent to the coordinator and the sites).")
    config = [toml_literal("out-dir", str(out_dir.resolve()))]
    if rounds is not None:
        config.append(f"num-server-rounds={int(rounds)}")
    argv = [flower_binary("flwr"), "run", str(app_dir.resolve()), connection,
            "--run-config", " ".join([*overrides, *config])]
    return [*argv, "--stream"] if stream else argv
