"""Real Flower processes on 127.0.0.1 for the deployment tests, started and stopped by PID.

Every process is started by this harness in its own session, and is stopped by its PID
(plus the PIDs of its own descendants, e.g. the `flower-superexec` a SuperLink spawns):
never by name, never anything this test did not start. Waiting loops are hang guards that
fail with the processes' logs, not timing assertions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
HANG_GUARD_S = 600.0  # a deployment round takes ~30-60 s on 2 cores; this only stops a hung test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """PIDs whose parent chain leads to `pid` (read from /proc), children first."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, ppid in parents.items() if ppid in frontier]
        out += kids
        frontier = kids
    return out


class Proc:
    """One process started by a test, with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.name, self.argv, self.log_path = name, list(argv), log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=dict(env),
                                      cwd=PROJECT, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _signal_tree(self, sig: int) -> None:
        for pid in [*reversed(descendants(self.pid)), self.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM this process and its descendants, SIGKILL whatever is left after `grace` seconds."""
        if self.alive():
            self._signal_tree(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL at once (a crash): the process and any descendants still running."""
        kids = descendants(self.pid)
        for pid in [*reversed(kids), self.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def wait_for(what: str, condition: Callable[[], bool], *, watch: Sequence[Proc] = (),
             limit: float = HANG_GUARD_S, poll: float = 1.0) -> None:
    """Poll until `condition()`; fail with the logs if a watched process dies or the hang guard trips."""
    end = time.monotonic() + limit
    while not condition():
        dead = [p for p in watch if not p.alive()]
        if dead or time.monotonic() > end:
            why = f"{dead[0].name} exited ({dead[0].popen.returncode})" if dead else f"hang guard ({limit:.0f} s)"
            logs = "\n".join(f"--- {p.name} ---\n{p.log()[-3000:]}" for p in watch)
            raise AssertionError(f"while waiting for {what}: {why}\n{logs}")
        time.sleep(poll)


def python_cli(*args: str) -> list[str]:
    """`fedrad ARGS` run from this checkout (the interpreter of the test run)."""
    return [sys.executable, "-m", "fedrad.cli", *args]
