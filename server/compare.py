"""`fedrad compare`: every transfer strategy on the same sites, splits and seeds, plus leave-one-site-out.

One job per (strategy, seed) and per (held-out site, seed). Jobs run in `workers` processes
(default: one per core, torch single-threaded in each: independent jobs scale better than
threads inside one small-batch job); each worker loads a site's images once and reuses them
for every job it runs, baselines and ClientApps alike (`client.dataset.load_site_cached`),
and every run caches its frozen-prefix features as a site does (`client.features`). Federated jobs run
in Flower's Simulation Engine (`server.simulate`), one at a time: Ray spreads each over the cores.

Results are deterministic for a seed whatever the number of workers.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.sites import discover_sites

log = logging.getLogger("fedrad.compare")
ENGINES = ("flower",)  # Flower's Simulation Engine; never a hand-made transport


@dataclass(frozen=True)
class StrategySpec:
    """A strategy of the comparison: how it trains and which config changes make it."""

    name: str
    kind: str  # "local" | "pooled" | "federated"
    changes: dict[str, Any]
    what: str
    cost: float  # relative compute, for scheduling the longest jobs first


STRATEGIES: tuple[StrategySpec, ...] = (
    StrategySpec("local", "local", {}, "each site alone, partial fine-tuning, nothing sent", 1.0),
    StrategySpec("pooled", "pooled", {}, "all sites' images in one place (upper bound, simulation only)", 1.0),
    StrategySpec("fedavg-full", "federated", {"freeze_blocks": -1, "bn_mode": "shared"},
                 "whole network and BN averaged (plain FedAvg)", 2.5),
    StrategySpec("fedbn", "federated", {"bn_mode": "fedbn"}, "partial fine-tuning, BN stays at each site", 1.0),
    StrategySpec("silobn", "federated", {"bn_mode": "silobn"},
                 "partial fine-tuning, BN statistics local, BN affine averaged", 1.0),
    StrategySpec("linear-probe", "federated", {"freeze_blocks": 17}, "frozen backbone, only the head shared", 0.3),
    StrategySpec("full", "federated", {"freeze_blocks": -1, "bn_mode": "fedbn"},
                 "full fine-tuning, BN per site", 2.5),
)
BY_NAME = {s.name: s for s in STRATEGIES}
LOSO_COST = 0.75


@dataclass(frozen=True)
class Job:
    """One unit of work: a strategy at a seed, or a held-out site at a seed."""

    kind: str  # "local" | "pooled" | "federated" | "loso"
    name: str  # strategy name, or the held-out site
    seed: int
    config: dict[str, Any]  # kebab-case run config
    out_dir: str
    engine: str = "flower"
    cost: float = 1.0


@dataclass
class ComparePlan:
    """What `compare` will run."""

    base: RunConfig
    strategies: list[str]
    seeds: list[int]
    sites: list[str]
    loso: bool
    loso_bn_mode: str
    out: Path
    engine: str
    jobs: list[Job] = field(default_factory=list)


def plan_compare(base: RunConfig, *, out: Path, seeds: int = 3, strategies: Sequence[str] | None = None,
                 loso: bool = True, loso_bn_mode: str = "silobn", engine: str = "flower") -> ComparePlan:
    """The job list, longest first; refuses unknown strategies / engines by name."""
    names = list(strategies) if strategies else [s.name for s in STRATEGIES]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"Unknown strategy {unknown}; known: {[s.name for s in STRATEGIES]}.")
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {ENGINES}; got {engine!r}.")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1; got {seeds}.")
    sites = [p.name for p in discover_sites(Path(base.data_dir))]
    plan = ComparePlan(base, names, [base.seed + i for i in range(seeds)], sites, loso and len(sites) >= 3,
                       loso_bn_mode, out, engine)
    for seed in plan.seeds:
        for name in names:
            spec = BY_NAME[name]
            cfg = base.replace(seed=seed, **spec.changes)
            folder = out / "runs" / name / f"seed-{seed}"
            plan.jobs.append(Job(spec.kind, name, seed, cfg.replace(out_dir=str(folder)).to_run_config(),
                                 str(folder), engine, spec.cost))
        if plan.loso:
            for site in sites:
                folder = out / "loso" / site / f"seed-{seed}"
                cfg = base.replace(seed=seed, bn_mode=loso_bn_mode, out_dir=str(folder))
                plan.jobs.append(Job("loso", site, seed, cfg.to_run_config(), str(folder), engine, LOSO_COST))
    plan.jobs.sort(key=lambda j: -j.cost)  # longest first: two workers finish together
    return plan


# ---- inside a worker process -------------------------------------------------------------------

def _site_data(folder: Path, cfg: RunConfig) -> Any:
    """A site's images, loaded once per worker and shared with the ClientApps it runs (`load_site_cached`)."""
    from client.dataset import load_site_cached
    from client.reference import raw_preprocessor

    return load_site_cached(folder, raw_preprocessor(cfg))


def _federate(engine: str) -> Callable[[RunConfig], dict[str, Any]]:
    """A federated run in Flower's Simulation Engine (the only engine)."""
    from server.simulate import simulate

    return lambda cfg: simulate(cfg, num_cpus=os.cpu_count())


def init_worker(threads: int) -> None:
    """Quiet, single-purpose worker: torch threads set once, Flower's INFO log off."""
    import flwr.common.logger  # noqa: F401 - sets Flower's own level on import; ours must come after
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    for handler in list(logging.getLogger("flwr").handlers):
        handler.setLevel(logging.WARNING)


def run_job(job: Job) -> dict[str, Any]:
    """Run one job; return its result row (see `server.compare_report`).

    Only wall time is reported: a federation's work runs in Flower's Ray actors, outside
    this process, so this process's CPU time would understate it.
    """
    from server.centralised import run_local, run_pooled

    cfg = RunConfig.from_run_config(job.config)
    out = {"kind": job.kind, "name": job.name, "seed": job.seed}
    folders = discover_sites(Path(cfg.data_dir))
    shutil.rmtree(job.out_dir, ignore_errors=True)  # a fresh run: never resume an older compare's checkpoint
    if job.kind in ("local", "pooled"):
        sites = [_site_data(f, cfg) for f in folders]
        return {**out, **(run_local if job.kind == "local" else run_pooled)(sites, cfg, Path(job.out_dir) / "sites")}
    if job.kind == "federated":
        report = _federate(job.engine)(cfg)
        return {**out, "sites": report["sites"], "wall_seconds": report["wall_seconds"],
                "full_model_bytes": report["full_model_bytes"],
                "shift_scores": _shift_scores(Path(job.out_dir))}
    if job.kind == "loso":
        from server.loso import run_leave_one_out

        held_out = _site_data(next(f for f in folders if f.name == job.name), cfg)
        return {**out, **run_leave_one_out(cfg, held_out, _federate(job.engine), Path(job.out_dir))}
    raise ValueError(f"unknown job kind {job.kind!r}")


def _shift_scores(run_dir: Path) -> dict[str, float]:
    from server.global_model import load_global_model

    return load_global_model(run_dir).registry.shift_scores()


# ---- the coordinator of the comparison ---------------------------------------------------------

def default_workers(engine: str) -> int:
    """One job at a time: Flower's Simulation Engine spreads each federation over the cores itself."""
    return 1


def execute(plan: ComparePlan, *, workers: int | None = None,
            on_done: Callable[[Job, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every job of the plan; `on_done(job, result)` after each. Returns the results in plan order."""
    workers = workers or default_workers(plan.engine)
    if plan.engine == "flower":
        workers = 1
    cpus = os.cpu_count() or 1
    results: dict[int, dict[str, Any]] = {}
    if workers == 1:
        init_worker(cpus)
        for i, job in enumerate(plan.jobs):
            results[i] = run_job(job)
            if on_done:
                on_done(job, results[i])
    else:
        threads = max(1, cpus // workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=init_worker,
                                 initargs=(threads,)) as pool:
            pending: dict[Future, int] = {pool.submit(run_job, job): i for i, job in enumerate(plan.jobs)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    results[i] = future.result()
                    if on_done:
                        on_done(plan.jobs[i], results[i])
    return [results[i] for i in range(len(plan.jobs))]


def compare(plan: ComparePlan, *, workers: int | None = None,
            on_done: Callable[[Job, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the plan and write OUT/compare.json, compare.md, compare.png; return the compare dict."""
    from server.compare_report import summarize, write_compare

    start = time.perf_counter()
    results = execute(plan, workers=workers, on_done=on_done)
    summary = summarize(plan, results, wall_seconds=time.perf_counter() - start)
    write_compare(summary, plan.out)
    return summary
