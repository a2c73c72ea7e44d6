"""`fedrad bench --virtual-sites N`: many tiny virtual hospitals in the Simulation Engine, timed and weighed.

Issue 19 asks what grows with the number of sites. This runs `fedrad simulate` (a child
process, as a user would) on N generated tiny sites and reports:

- `virtual_round_seconds`: the coordinator's wall time of each round (its checkpoint clock),
  and the whole run's wall time including Ray's start;
- `virtual_peak_pss_mb` / `virtual_peak_rss_mb`: the peak memory of the whole simulation, summed
  over its process tree (driver, Ray's own processes, the ClientApp actors), sampled every
  0.5 s: PSS splits shared pages among the processes that map them, so it is what the
  simulation takes from the machine;
- `virtual_peak_pss_by_role_mb`: the same peak split by role (driver: the ServerApp and
  coordinator; actors: the ClientApps; ray: raylet, GCS, ...), each its own peak, so a
  role that grows with N shows itself;
- the per-site AUCs (to check a memory fix changed no result).

The sites are tiny on purpose (16 patients, 96-px slices, one local epoch): what is measured
is what the federation costs per site, not training. Their folders carry a site policy with
`min-count = 2` (a site's own decision: with the default 11 a 16-patient site would
withhold its aggregates and not train), written by the benchmark into the sites it makes.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fedrad.lab.deploy_bench import PeakMemory

TINY_RUN = "local-epochs=1 batch-size=8 fov-mm=32.0"
TINY_POLICY = "min-count = 2\n"


def make_tiny_sites(data: Path, n_sites: int, *, patients: int = 16, image_size: int = 96, seed: int = 3) -> Path:
    """`n_sites` small synthetic hospitals (scanners varying a little) under `data`, each with a site policy."""
    from fedrad.lab.synth import SiteSpec, generate

    kernels = ("smooth", "sharp")
    specs = [SiteSpec(name=f"s{i:03d}", n_patients=patients, prevalence=0.5, spacing_mm=0.7 + 0.002 * i,
                      noise_hu=10, kernel=kernels[i % 2], hu_offset=5 * (i % 5), manufacturer="GE")
             for i in range(n_sites)]
    for folder in generate(data, sites=specs, seed=seed, image_size=image_size):
        (folder / "site-policy.toml").write_text(TINY_POLICY)
    return data


@contextlib.contextmanager
def tiny_sites_folder(n_sites: int, *, patients: int = 16) -> Iterator[Path]:
    """A temporary folder of `make_tiny_sites` (for `fedrad bench --deploy --tiny-sites`), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fedrad-tiny-sites-") as tmp:
        yield make_tiny_sites(Path(tmp) / "data", n_sites, patients=patients)


def role(title: str, root: bool) -> str:
    """Which part of a simulation a process is, from its title: driver, actors (Ray workers: the
    ClientApps, `ray::ClientAppActor...` or `ray::IDLE`) or ray (raylet, GCS, agents, monitors)."""
    if root:
        return "driver"
    if title.startswith("ray::") and not title.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "actors"
    return "ray"


class PeakByRole(PeakMemory):
    """Samples the PSS/RSS of a process tree every `every` s: the peak of the sum, and each role's own peak."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(lambda: [pid], every)
        self.pid = pid
        self.by_role: dict[str, int] = {}
        self.samples = 0

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        pss = rss = 0
        roles: dict[str, int] = {}
        for proc in tree:
            try:
                info = proc.memory_full_info()
                name, cmdline = proc.name(), proc.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            value = getattr(info, "pss", info.rss)
            pss, rss = pss + value, rss + info.rss
            kind = role(cmdline[0] if cmdline else name, proc.pid == self.pid)
            roles[kind] = roles.get(kind, 0) + value
        self.samples += 1
        self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)
        for kind, value in roles.items():
            self.by_role[kind] = max(self.by_role.get(kind, 0), value)


def run_virtual_sites(data: Path, out: Path, *, rounds: int, run_config: str, extra: Sequence[str] = (),
                      launcher: Sequence[str] = ("-m", "fedrad.cli")) -> dict[str, Any]:
    """`fedrad simulate` of the sites under `data` as a child process: round times, wall time, peak memory.

    `launcher`: how Python starts fedrad's CLI (a script that patches something first, for an experiment).
    """
    from fedrad.server.checkpoint import checkpoint_path, load_checkpoint

    cmd = [sys.executable, *launcher, "simulate", "--data", str(data), "--out", str(out),
           "--rounds", str(rounds), *(["--run-config", run_config] if run_config else []), *extra]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        with PeakByRole(proc.pid) as peak:
            proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (out.parent / f"{out.name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"fedrad simulate failed (exit {proc.returncode}):\n{tail}")
    ckpt = load_checkpoint(checkpoint_path(out))
    report = json.loads((out / "report.json").read_text())
    return {"virtual_sites": len(report["sites"]), "virtual_rounds": rounds, "virtual_run_config": run_config,
            "virtual_round_seconds": [round(float(ckpt.round_seconds[r]), 2) for r in range(1, rounds + 1)],
            "virtual_wall_seconds": round(wall, 2),
            "virtual_peak_pss_mb": round(peak.pss / 2**20, 1), "virtual_peak_rss_mb": round(peak.rss / 2**20, 1),
            "virtual_peak_pss_by_role_mb": {k: round(v / 2**20, 1) for k, v in sorted(peak.by_role.items())},
            "virtual_memory_samples": peak.samples,
            "virtual_auc": {s["name"]: s["auc"] for s in report["sites"]}}


def virtual_sites_bench(out: Path, *, n_sites: int = 100, patients: int = 16, rounds: int = 5,
                        run_config: str = TINY_RUN, data: Path | None = None, extra: Sequence[str] = (),
                        progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate (or reuse `data`) and simulate; merges the figures into out/bench.json and returns them."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedrad-virtual-sites-") as tmp:
        if data is None:
            progress(f"{n_sites} tiny synthetic hospitals, {patients} patients each ...")
            data = make_tiny_sites(Path(tmp) / "data", n_sites, patients=patients)
        progress(f"{rounds} rounds in the Simulation Engine ...")
        results = run_virtual_sites(data, Path(tmp) / "sim", rounds=rounds, run_config=run_config, extra=extra)
    path = out / "bench.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2))
    return results


def main(args: Any) -> int:
    """`fedrad bench --virtual-sites N`: run, print the figures, write bench.json."""
    from rich.console import Console

    console = Console()
    run_config = " ".join(args.run_config) if args.run_config else TINY_RUN
    results = virtual_sites_bench(args.out, n_sites=args.virtual_sites, patients=args.patients, rounds=args.rounds,
                                  run_config=run_config, data=args.data,
                                  progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    rounds = ", ".join(f"{s:.1f}" for s in results["virtual_round_seconds"])
    roles = ", ".join(f"{k} {v:,.0f}" for k, v in results["virtual_peak_pss_by_role_mb"].items())
    console.print(f"{results['virtual_sites']} virtual sites · {results['virtual_rounds']} rounds: {rounds} s "
                  f"(wall {results['virtual_wall_seconds']:.1f} s with Ray's start) · peak "
                  f"{results['virtual_peak_pss_mb']:,.0f} MB PSS ({results['virtual_peak_rss_mb']:,.0f} MB RSS) · "
                  f"by role, MB PSS: {roles}", soft_wrap=True)
    console.print(f"written: {args.out / 'bench.json'}", soft_wrap=True)
    return 0
