"""A secure deployment on loopback for tests: a coordinator and site daemons started through `fedrad`."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
from pathlib import Path

from fedrad.common.flower_tools import flower_binary, flower_env
from tests.deploy.harness import PROJECT, Proc, free_port, python_cli, wait_for

FAST_RUN = "local-epochs=1 batch-size=8 fov-mm=32.0 min-sites=2"


class Deployment:
    """One SuperLink (TLS + node auth) and any number of SuperNodes; `close()` stops exactly these."""

    def __init__(self, root: Path, certs: Path, data: Path) -> None:
        self.root, self.certs, self.data = root, certs, data
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.state = root / "state"
        self.coordinator: Proc | None = None
        self.sites: dict[str, Proc] = {}
        self._n = 0

    def env(self, **extra: str) -> dict[str, str]:
        """Flower's quiet environment with this checkout importable; daemons keep their Flower home in state/work."""
        env = {k: v for k, v in flower_env().items() if k != "FLWR_HOME"}
        env.update(PYTHONPATH=str(PROJECT), NO_COLOR="1", COLUMNS="200", **extra)
        return env

    def cli_env(self) -> dict[str, str]:
        return self.env(FLWR_HOME=str(self.root / "cli-home"))

    def _proc(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        self._n += 1
        return Proc(name, argv, self.root / f"{self._n:02d}-{name}.log", env)

    def start_coordinator(self) -> Proc:
        self.coordinator = self._proc("coordinator", python_cli(
            "coordinator", "--certs", str(self.certs), "--state", str(self.state), "--port", str(self.port)),
            self.env())

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for("the coordinator to listen", listening, watch=[self.coordinator], poll=0.3)
        return self.coordinator

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(python_cli(*args), env=self.cli_env(), cwd=PROJECT, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"fedrad {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def register(self, *sites: str) -> str:
        args = [f"--site={s}" for s in sites]
        return self.cli("register", "--certs", str(self.certs), "--superlink", self.address, *args).stdout

    def start_site(self, site: str, *, bundle: str | None = None, extra: tuple[str, ...] = (), name: str = "",
                   node_config: str = "") -> Proc:
        """`fedrad site ...` for one site; with `node_config`, flower-supernode with extra node config keys."""
        args = ["--bundle", str(self.certs / "sites" / (bundle or site)), "--data", str(self.data / site),
                "--work", str(self.root / "work" / site), "--superlink", self.address, "--port", str(free_port())]
        argv = python_cli("site", *args, "--threads", "1", *extra)
        if node_config:
            dry = self.cli("site", *args, "--dry-run").stdout.strip()
            argv = shlex.split(dry)
            i = argv.index("--node-config") + 1
            argv[i] += " " + node_config
        proc = self._proc(name or f"site-{site}", argv, self.env(OMP_NUM_THREADS="1"))
        self.sites[name or site] = proc
        return proc

    def online(self) -> int:
        """Number of SuperNodes the coordinator sees online (`flwr supernode list`)."""
        out = subprocess.run([flower_binary("flwr"), "supernode", "list", "fedrad", "--format", "json"],
                             env=self.cli_env(), capture_output=True, text=True).stdout
        try:
            nodes = json.loads(out[out.find("{"):])["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(n["status"] == "online" for n in nodes)

    def wait_online(self, n: int) -> None:
        wait_for(f"{n} sites online", lambda: self.online() >= n, watch=[self.coordinator, *self.sites.values()],
                 poll=1.0)

    def submit(self, out: Path, run_config: str, *, rounds: int = 2, app: Path | None = None) -> str:
        """Submit a run with `fedrad submit` (returns once submitted); its output."""
        proc = self.cli("submit", "--certs", str(self.certs), "--superlink", self.address, "--out", str(out),
                        "--rounds", str(rounds), "--run-config", run_config, *(["--app", str(app)] if app else []))
        return proc.stdout + proc.stderr

    def close(self) -> None:
        """Sites first, then the coordinator; each by its own PID."""
        for proc in self.sites.values():
            proc.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
