"""The site daemon's supervisor: the SuperNode plus the site's warm ClientApp process, kept running together.

`fedrad site` runs this (unless `--cold`). It starts the SuperNode with `--isolation
process` (Flower then runs no ClientApp itself) and one warm ClientApp process
(`fedrad.client.warm_clientapp`) on the SuperNode's local Runtime API. It

- restarts the warm process whenever it exits (crash, kill, or its own memory bound),
  at once the first time and with a growing pause (up to 30 s) if it keeps dying young;
- ends when the SuperNode ends, with the SuperNode's exit code, after stopping the warm
  process (systemd / the container runtime then restarts the whole daemon);
- passes SIGTERM / SIGINT on to both and waits for them.

The SuperNode's output is this process's output (the operator's log shows both).

    python -m fedrad.client.site_supervisor [--max-memory-mb N] [--poll-interval S] -- <flower-supernode arguments>
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger("fedrad.site")
YOUNG_S = 10.0  # a warm process that dies sooner than this after its start is restarted after a pause


def runtime_api_address(supernode_args: Sequence[str]) -> str:
    """HOST:PORT of the SuperNode's Runtime API, from its `--host` / `--port` flags (Flower's defaults otherwise)."""
    def flag(name: str, default: str) -> str:
        args = list(supernode_args)
        return args[args.index(name) + 1] if name in args[:-1] else default

    return f"{flag('--host', '127.0.0.1')}:{flag('--port', '9094')}"


def supernode_argv(supernode: Sequence[str], poll_interval: float | None) -> list[str]:
    """The SuperNode's command line: process isolation on, and its idle wait capped when `poll_interval` is set."""
    argv = [a for a in supernode]
    if "--isolation" in argv:
        i = argv.index("--isolation")
        del argv[i:i + 2]
    argv += ["--isolation", "process"]
    if poll_interval is None:
        return argv
    return [sys.executable, "-m", "fedrad.client.supernode_polling", "--poll-interval", str(poll_interval), "--",
            *argv[1:]]


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


class Supervisor:
    def __init__(self, supernode: list[str], worker: list[str], address: str) -> None:
        self.supernode_cmd, self.worker_cmd, self.address = supernode, worker, address
        self.supernode: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.stopping = False
        self.restarts = 0

    def _start_worker(self) -> None:
        self.worker = subprocess.Popen(self.worker_cmd)
        self.worker_started = time.monotonic()
        log.info("warm ClientApp process %d started", self.worker.pid)

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for proc in (self.worker, self.supernode):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.supernode = subprocess.Popen(self.supernode_cmd)
        while not self.stopping and self.supernode.poll() is None and not _listening(self.address):
            time.sleep(0.1)
        pause = 0.0
        while not self.stopping and self.supernode.poll() is None:
            if self.worker is None:
                self._start_worker()
            elif (code := self.worker.poll()) is not None:
                lived = time.monotonic() - self.worker_started
                pause = 0.0 if lived >= YOUNG_S else min(30.0, max(1.0, 2 * pause))
                log.warning("warm ClientApp process %d exited (%s) after %.0f s; starting another%s", self.worker.pid,
                            code, lived, f" in {pause:.0f} s" if pause else "")
                self.restarts += 1
                self.worker = None
                deadline = time.monotonic() + pause
                while time.monotonic() < deadline and not self.stopping and self.supernode.poll() is None:
                    time.sleep(0.2)
                continue
            time.sleep(0.2)
        self._stop(signal.SIGTERM, None)
        for proc in (self.worker, self.supernode):
            if proc is not None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        return self.supernode.returncode if self.supernode.returncode is not None else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.exit("usage: python -m fedrad.client.site_supervisor [--max-memory-mb N] [--poll-interval S] -- "
                 "flower-supernode <arguments>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m fedrad.client.site_supervisor")
    parser.add_argument("--max-memory-mb", type=int, default=0)
    parser.add_argument("--poll-interval", type=float, default=None)
    args = parser.parse_args(argv[:split])
    supernode = argv[split + 1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    address = runtime_api_address(supernode)
    worker = [sys.executable, "-m", "fedrad.client.warm_clientapp", "--runtime-api-address", address,
              "--parent-pid", str(os.getpid()), "--max-memory-mb", str(args.max_memory_mb)]
    return Supervisor(supernode_argv(supernode, args.poll_interval), worker, address).run()


if __name__ == "__main__":
    sys.exit(main())
