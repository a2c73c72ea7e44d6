"""`fedrad compare`: run every job of a `ComparePlan` and write the comparison.

Jobs run one after another in this process: each federated job runs in Flower's
Simulation Engine (`fedrad.lab.simulate`), which spreads it over the cores itself. The
process loads a site's images once and reuses them for every job, baselines and ClientApps
alike (`fedrad.client.loaded_sites.load_site_cached`), and every run caches its
frozen-prefix features as a site does (`fedrad.client.features`).

Results are deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrad.common.config import RunConfig
from fedrad.common.sites import discover_sites
from fedrad.lab.compare_plan import ComparePlan, Job

log = logging.getLogger("fedrad.compare")


def _site_data(folder: Path, cfg: RunConfig) -> Any:
    """A site's images, loaded once per process and shared with the ClientApps it runs (`load_site_cached`)."""
    from fedrad.client.loaded_sites import load_site_cached
    from fedrad.client.reference import raw_preprocessor

    return load_site_cached(folder, raw_preprocessor(cfg))


def _federate(cfg: RunConfig) -> dict[str, Any]:
    """A federated run in Flower's Simulation Engine."""
    from fedrad.lab.simulate import simulate

    return simulate(cfg, num_cpus=os.cpu_count())


def quiet_flower() -> None:
    """Flower's INFO log off (compare prints one line per job, not per round); torch on every core."""
    import flwr.common.logger  # noqa: F401 - sets Flower's own level on import; ours must come after
    import torch

    torch.set_num_threads(os.cpu_count() or 1)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    for handler in list(logging.getLogger("flwr").handlers):
        handler.setLevel(logging.WARNING)


def run_job(job: Job) -> dict[str, Any]:
    """Run one job; return its result row (see `fedrad.lab.compare_report`).

    Only wall time is reported: a federation's work runs in Flower's Ray actors, outside
    this process, so this process's CPU time would understate it.
    """
    from fedrad.lab.centralised import run_local, run_pooled

    cfg = RunConfig.from_run_config(job.config)
    out = {"kind": job.kind, "name": job.name, "seed": job.seed, "lr_chosen": cfg.lr_max}
    folders = discover_sites(Path(cfg.data_dir))
    shutil.rmtree(job.out_dir, ignore_errors=True)  # a fresh run: never resume an older compare's checkpoint
    if job.kind in ("local", "pooled"):
        sites = [_site_data(f, cfg) for f in folders]
        return {**out, **(run_local if job.kind == "local" else run_pooled)(sites, cfg, Path(job.out_dir) / "sites")}
    if job.kind == "federated":
        report = _federate(cfg)
        return {**out, "sites": report["sites"], "wall_seconds": report["wall_seconds"],
                "full_model_bytes": report["full_model_bytes"],
                "shift_scores": _shift_scores(Path(job.out_dir))}
    if job.kind == "loso":
        from fedrad.lab.loso import run_leave_one_out

        held_out = _site_data(next(f for f in folders if f.name == job.name), cfg)
        return {**out, **run_leave_one_out(cfg, held_out, _federate, Path(job.out_dir))}
    raise ValueError(f"unknown job kind {job.kind!r}")


def _shift_scores(run_dir: Path) -> dict[str, float]:
    from fedrad.server.global_model import load_global_model

    return load_global_model(run_dir).registry.shift_scores()


RESULT = "compare-result.json"  # in each job's folder: its config and result row, for --resume


def finished(job: Job) -> dict[str, Any] | None:
    """The result row a job left in its folder, if it ran to the end with exactly this config (--resume)."""
    import json

    path = Path(job.out_dir) / RESULT
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["result"] if saved.get("config") == job.config else None


def run_or_reuse(job: Job, resume: bool) -> dict[str, Any]:
    """Run a job (or, with `resume`, take its finished result) and keep its result row in its folder."""
    import json

    if resume and (done := finished(job)) is not None:
        log.info("reused (--resume): %s %s seed %d", "tuning" if job.tuning else job.kind, job.name, job.seed)
        return done
    result = run_job(job)
    path = Path(job.out_dir) / RESULT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": job.config, "result": result}, default=float))
    return result


def execute(plan: ComparePlan, *, on_done: Callable[[Job, dict[str, Any]], None] | None = None,
            resume: bool = False) -> list[dict[str, Any]]:
    """Tune each strategy's lr-max (when the plan has a grid), then run every job of the plan in order.

    `on_done(job, result)` after each job, tuning runs included. Returns the real runs'
    results in plan order; the tuning is in `plan_tuned` (set here) for the report. With
    `resume`, a job whose folder holds its finished result for the same config is not run again.
    """
    from fedrad.lab.lr_tuning import carve_validation, choose_lr, tuning_summary, validation_auc

    quiet_flower()
    chosen: dict[str, float] = dict(plan.preset)
    if plan.preset:
        plan.tuned = {"lr_from": plan.preset}
        log.info("lr-max from an earlier compare's tuning: %s", ", ".join(f"{k} {v:g}" for k, v in chosen.items()))
    if plan.tuning:
        carve_validation(Path(plan.base.data_dir), plan.tuning_data, seed=plan.base.seed)
        scores: dict[str, dict[float, float]] = {}
        for job in plan.tuning:
            result = run_or_reuse(job, resume)
            scores.setdefault(job.name, {})[float(job.config["lr-max"])] = validation_auc(result)
            if on_done:
                on_done(job, result)
        chosen = {name: choose_lr(by_lr) for name, by_lr in scores.items()}
        plan.tuned = tuning_summary(plan.lr_grid, scores, chosen)
        log.info("lr-max chosen on the validation split: %s", ", ".join(f"{k} {v:g}" for k, v in chosen.items()))
    results = []
    for job in plan.jobs:
        name = plan.loso_bn_mode if job.kind == "loso" else job.name  # leave-one-out: its federation's strategy
        if name in chosen:
            job = dataclasses.replace(job, config={**job.config, "lr-max": chosen[name]})
        results.append(run_or_reuse(job, resume))
        if on_done:
            on_done(job, results[-1])
    return results


def compare(plan: ComparePlan, *, on_done: Callable[[Job, dict[str, Any]], None] | None = None,
            resume: bool = False) -> dict[str, Any]:
    """Run the plan and write OUT/compare.json, compare.md, compare.png; return the compare dict."""
    from fedrad.lab.compare_report import summarize, write_compare

    start = time.perf_counter()
    results = execute(plan, on_done=on_done, resume=resume)
    summary = summarize(plan, results, wall_seconds=time.perf_counter() - start)
    write_compare(summary, plan.out)
    return summary
