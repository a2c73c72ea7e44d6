"""`fedrad bench --deploy`: a real secure deployment on loopback, timed round by round, beside the simulation.

What it runs: `fedrad provision` (CA, coordinator certificate, one key per site), `fedrad
coordinator` (SuperLink, TLS + node authentication), `fedrad register`, one `fedrad site`
daemon per site, and `fedrad submit` of an R-round run — the same commands an operator
types (deploy/README.md), on synthetic hospitals. Then the same data and run config in the
Simulation Engine.

What it reports (bench.json):
- `deploy_round_seconds`: the coordinator's wall time of each round (its checkpoint clock);
- `deploy_site_compute_seconds`: per round, the largest of the sites' own reported compute:
  the training loop's `seconds` (measured inside the ClientApp and sent with the update),
  plus `eval-seconds` where a site reports it (sites of this version report training only:
  the evaluation of a few dozen test images on cached features is a fraction of a second);
- `deploy_overhead_seconds` = round - max site compute: what the deployment adds (process
  starts, loading, polling, TLS, serialisation); its median over rounds 2..R is the headline;
- `deploy_site_peak_rss_mb` / `deploy_site_peak_pss_mb`: the peak memory of all site processes
  together (daemons and whatever they start), sampled every 0.5 s: summed RSS (counts shared
  library pages once per process) and summed PSS (what they take from the machine);
- the `sim_` figures of the same run in the Simulation Engine, and the ratio of the median
  rounds (2..R), so the deployment's cost is read against simulation on the same machine.

Every process it starts is stopped by its own PID (and its descendants), never by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

SITES = ("site-a", "site-b", "site-c")
HANG_GUARD_S = 1800.0  # stops a hung benchmark; a healthy one takes a few minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_memory(pids: Sequence[int]) -> tuple[int, int]:
    """(RSS, PSS) bytes of these processes and all their descendants, now.

    RSS counts the shared pages of every process again (torch's libraries, mapped by each
    site process); PSS splits each shared page among the processes that map it, so the
    PSS sum is what the processes together take from the machine.
    """
    import psutil

    rss = pss = 0
    for pid in pids:
        for proc in _tree(pid):
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
    return rss, pss


class PeakMemory:
    """Samples `tree_memory(pids())` every `every` seconds in a thread; `.rss` / `.pss`: the largest sums seen."""

    def __init__(self, pids: Callable[[], Sequence[int]], every: float = 0.5) -> None:
        self.rss = self.pss = 0
        self._pids, self._every = pids, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """One look at the processes' memory; a subclass may record more per sample."""
        rss, pss = tree_memory(self._pids())
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._every)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Processes:
    """Daemons this benchmark started, each logging to a file; `stop()` ends exactly these (and their children)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def pids(self, prefix: str = "") -> list[int]:
        return [p.pid for name, p in self.started if name.startswith(prefix) and p.poll() is None]

    def check_alive(self) -> None:
        for name, proc in self.started:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited ({proc.returncode}) during the benchmark:\n{tail}")

    def stop(self) -> None:
        """SIGTERM sites first, then the coordinator (reverse start order), with their descendants; SIGKILL leftovers."""
        for _, proc in reversed(self.started):
            for p in reversed(_tree(proc.pid)):
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for _, proc in reversed(self.started):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                for p in reversed(_tree(proc.pid)):
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(10)


def _wait(what: str, condition: Callable[[], bool], procs: Processes, poll: float = 0.5) -> None:
    end = time.monotonic() + HANG_GUARD_S
    while not condition():
        procs.check_alive()
        if time.monotonic() > end:
            raise RuntimeError(f"gave up waiting for {what} after {HANG_GUARD_S:.0f} s; logs in {procs.logs}")
        time.sleep(poll)


def make_sites(data: Path, n_sites: int = 3, patients: int = 40, seed: int = 0) -> Path:
    """`n_sites` synthetic hospitals (the demo's: the default sites' scanners, `patients` each)."""
    from fedrad.lab.synth import default_sites, generate

    base = default_sites()
    specs = [dataclasses.replace(base[i % len(base)], name=f"site-{i:02d}" if n_sites > len(base) else base[i].name,
                                 n_patients=patients) for i in range(n_sites)]
    generate(data, sites=specs, seed=seed)
    return data


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedrad.cli", *args]


def _site_compute(ckpt: Any, rounds: int) -> dict[str, list[float]]:
    """Per round: the largest site compute (train `seconds` + `eval-seconds`) and the sites' values."""
    out: dict[str, list[float]] = {"max": []}
    for r in range(1, rounds + 1):
        per_site = [float(s.train.get(r, {}).get("seconds", 0.0)) + float(s.evaluate.get(r, {}).get("eval-seconds", 0.0))
                    for s in ckpt.sites.values()]
        out["max"].append(round(max(per_site, default=0.0), 3))
    return out


def _figures(prefix: str, out: Path, rounds: int) -> dict[str, Any]:
    from fedrad.server.checkpoint import checkpoint_path, load_checkpoint

    ckpt = load_checkpoint(checkpoint_path(out))
    report = json.loads((out / "report.json").read_text())
    round_s = [float(ckpt.round_seconds[r]) for r in range(1, rounds + 1)]
    compute = _site_compute(ckpt, rounds)["max"]
    overhead = [round(r - c, 3) for r, c in zip(round_s, compute)]
    later = overhead[1:] or overhead
    phases = [report.get("round_phase_seconds", {}).get(str(r), {}) for r in range(2, rounds + 1)]
    names = sorted({k for p in phases for k in p})
    return {f"{prefix}_coordinator_phase_median_seconds":  # rounds 2..N: where the coordinator's side of a round goes
            {k: round(statistics.median([p.get(k, 0.0) for p in phases]), 3) for k in names},
            f"{prefix}_round_seconds": round_s, f"{prefix}_site_compute_seconds": compute,
            f"{prefix}_overhead_seconds": overhead,
            f"{prefix}_overhead_median_seconds": round(statistics.median(later), 3),
            f"{prefix}_round_median_seconds": round(statistics.median(round_s[1:] or round_s), 3),
            f"{prefix}_auc": {s["name"]: s["auc"] for s in report["sites"]}}


def run_deployment(data: Path, root: Path, *, rounds: int, run_config: str, site_args: Sequence[str] = (),
                   progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Provision, start the coordinator and one daemon per site folder under `data`, run, stop; the figures."""
    from fedrad.common.flower_tools import flower_binary, flower_env
    from fedrad.common.sites import discover_sites

    sites = discover_sites(data)
    names = [s.name for s in sites]
    port = _free_port()
    address = f"127.0.0.1:{port}"
    certs, state, out = root / "certs", root / "coordinator", root / "run"
    env = flower_env({"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                     os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                      "NO_COLOR": "1", "COLUMNS": "200", "FLWR_HOME": str(root / "cli-home")})
    daemon_env = {k: v for k, v in env.items() if k != "FLWR_HOME"}
    subprocess.run(_cli("provision", "--certs", str(certs), "--port", str(port),
                        *[a for n in names for a in ("--site", n)]), env=env, check=True, capture_output=True)
    procs = Processes(root / "logs")
    try:
        procs.start("coordinator", _cli("coordinator", "--certs", str(certs), "--state", str(state),
                                        "--port", str(port)), daemon_env)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        _wait("the coordinator to listen", listening, procs)
        subprocess.run(_cli("register", "--certs", str(certs), "--superlink", address), env=env, check=True,
                       capture_output=True)
        progress(f"{len(sites)} site daemons ...")
        for site in sites:
            procs.start(f"site-{site.name}", _cli("site", "--bundle", str(certs / "sites" / site.name),
                                                  "--data", str(site), "--work", str(root / "work" / site.name),
                                                  "--superlink", address, "--port", str(_free_port()),
                                                  "--threads", "1", *site_args),
                        {**daemon_env, "OMP_NUM_THREADS": "1"})

        def online() -> bool:
            res = subprocess.run([flower_binary("flwr"), "supernode", "list", "fedrad", "--format", "json"],
                                 env=env, capture_output=True, text=True).stdout
            try:
                return sum(n["status"] == "online" for n in json.loads(res[res.find("{"):])["nodes"]) >= len(sites)
            except (ValueError, KeyError):
                return False

        _wait(f"{len(sites)} sites online", online, procs, poll=1.0)
        progress(f"{rounds} rounds over TLS with node authentication ...")
        with PeakMemory(lambda: procs.pids("site-")) as peak:
            start = time.perf_counter()
            subprocess.run(_cli("submit", "--certs", str(certs), "--superlink", address, "--out", str(out),
                                "--rounds", str(rounds), "--run-config", run_config), env=env, check=True,
                           capture_output=True)
            _wait("the report", lambda: (out / "report.json").is_file(), procs)
            wall = time.perf_counter() - start
        figures = _figures("deploy", out, rounds)
        figures.update(deploy_wall_seconds=round(wall, 2), deploy_site_peak_rss_mb=round(peak.rss / 2**20, 1),
                       deploy_site_peak_pss_mb=round(peak.pss / 2**20, 1), deploy_sites=len(sites))
        return figures
    finally:
        procs.stop()


def deploy_bench(out: Path, *, data: Path | None = None, rounds: int = 5, n_sites: int = 3, patients: int = 40,
                 run_config: str = "", simulate: bool = True, site_args: Sequence[str] = (),
                 progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Deployment (and simulation) of the same `n_sites` hospitals for `rounds` rounds; writes out/bench.json."""
    results: dict[str, Any] = {"deploy_rounds": rounds, "deploy_site_args": " ".join(site_args)}
    with tempfile.TemporaryDirectory(prefix="fedrad-deploy-bench-") as tmp:
        root = Path(tmp)
        if data is None:
            progress(f"{n_sites} synthetic hospitals, {patients} patients each ...")
            data = make_sites(root / "data", n_sites, patients)
        try:
            results.update(run_deployment(data, root / "deploy", rounds=rounds, run_config=run_config,
                                          site_args=site_args, progress=progress))
        finally:  # the daemons' logs outlive the temporary folder: where a round's time went, per message
            logs = out / "deploy-logs"
            shutil.rmtree(logs, ignore_errors=True)
            for log_file in (root / "deploy").rglob("*.log"):
                target = logs / log_file.relative_to(root / "deploy")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log_file, target)
        results.update(message_times(out / "deploy-logs"))
        if simulate:
            progress("the same run in the Simulation Engine ...")
            results.update(simulation_figures(data, root / "sim", rounds=rounds, run_config=run_config))
            results["deploy_vs_sim_round_ratio"] = round(results["deploy_round_median_seconds"]
                                                         / results["sim_round_median_seconds"], 2)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2))
    return results


MESSAGE_TIMES = re.compile(r"(\w+) message: pull ([0-9.]+) s(?: \(header ([0-9.]+) s, arrays ([0-9.]+) s, "
                           r"app ([0-9.]+) s\))?, ClientApp ([0-9.]+) s, push ([0-9.]+) s")


def message_times(logs: Path) -> dict[str, Any]:
    """Median seconds per message of the warm sites' three steps, per message type, from their logs.

    pull: from the task's start to the message with its arrays in the ClientApp (SuperLink ->
    SuperNode -> ClientApp), split into the header, the arrays (waiting for the SuperNode to
    fetch them, then taking them) and loading the app; ClientApp: the handler (site compute
    included); push: the reply back to the SuperNode. Empty for `--cold` sites (Flower's own process logs no such line).
    """
    steps = ("pull", "pull_header", "pull_arrays", "pull_app", "clientapp", "push")
    found: dict[str, list[tuple[str, ...]]] = {}
    for log_file in sorted(logs.rglob("*.log")) if logs.is_dir() else []:
        for kind, *times in MESSAGE_TIMES.findall(log_file.read_text(errors="replace")):
            found.setdefault(kind, []).append(tuple(times))
    return {f"deploy_{kind}_message_median_seconds": {step: round(statistics.median(float(t[i]) for t in times), 3)
                                                      for i, step in enumerate(steps) if all(t[i] for t in times)}
            | {"messages": len(times)} for kind, times in found.items()}


def simulation_figures(data: Path, out: Path, *, rounds: int, run_config: str) -> dict[str, Any]:
    """`fedrad simulate` of the same data and run config (a child process): round times, compute, peak memory."""
    cmd = _cli("simulate", "--data", str(data), "--out", str(out), "--rounds", str(rounds),
               *(["--run-config", run_config] if run_config else []))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakMemory(lambda: [proc.pid]) as peak:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fedrad simulate failed (exit {proc.returncode}):\n{err[-3000:]}")
    figures = _figures("sim", out, rounds)
    figures.update(sim_wall_seconds=round(time.perf_counter() - start, 2), sim_peak_rss_mb=round(peak.rss / 2**20, 1),
                   sim_peak_pss_mb=round(peak.pss / 2**20, 1))
    return figures


def main(args: Any) -> int:
    """`fedrad bench --deploy`: run, print the round table, write bench.json."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    site_args = ["--cold"] if args.cold else ["--warm", "--poll-interval", str(args.poll_interval)]
    results = deploy_bench(args.out, data=args.data, rounds=args.rounds, n_sites=args.sites, patients=args.patients,
                           run_config=" ".join(args.run_config), simulate=not args.no_simulate, site_args=site_args,
                           progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    table = Table(title=f"fedrad bench --deploy · {results['deploy_sites']} sites on loopback, TLS + node "
                        f"authentication · {args.rounds} rounds")
    for column in ("round", "deploy s", "max site compute s", "overhead s", *(("simulation s",) if
                                                                              "sim_round_seconds" in results else ())):
        table.add_column(column, justify="right")
    for i in range(args.rounds):
        row = [str(i + 1), f"{results['deploy_round_seconds'][i]:.2f}", f"{results['deploy_site_compute_seconds'][i]:.2f}",
               f"{results['deploy_overhead_seconds'][i]:.2f}"]
        if "sim_round_seconds" in results:
            row.append(f"{results['sim_round_seconds'][i]:.2f}")
        table.add_row(*row)
    console.print(table)
    console.print(f"overhead, median of rounds 2..{args.rounds}: {results['deploy_overhead_median_seconds']:.2f} s · "
                  f"site processes' peak memory {results['deploy_site_peak_pss_mb']:,.0f} MB PSS "
                  f"({results['deploy_site_peak_rss_mb']:,.0f} MB RSS)"
                  + (f" · deployment/simulation round ratio {results['deploy_vs_sim_round_ratio']:.2f}"
                     if "deploy_vs_sim_round_ratio" in results else ""), soft_wrap=True)
    console.print(f"written: {args.out / 'bench.json'}", soft_wrap=True)
    return 0
