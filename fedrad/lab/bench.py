"""`fedrad bench`: the figures behind BENCHMARKS.md, measured on this machine.

- epoch time of local training with and without the frozen-prefix cache (same site, same
  freeze point, same seed, one process), the cache's one-off build time, images/s;
- bytes a site sends per round for each strategy, measured by serialising the reply a
  site would send (Flower's own protobuf), beside a full-model FedAvg exchange;
- wall time and peak memory (all processes: driver + Ray actors) of a default simulation.

Speed is reported here, never asserted in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES: dict[str, dict[str, Any]] = {
    "linear-probe": {"freeze_blocks": 17, "bn_mode": "fedbn"},
    "fedbn (freeze-blocks 14, default)": {"freeze_blocks": 14, "bn_mode": "fedbn"},
    "fedbn (freeze-blocks 12)": {"freeze_blocks": 12, "bn_mode": "fedbn"},
    "full fine-tuning, fedbn": {"freeze_blocks": -1, "bn_mode": "fedbn"},
    "fedavg-full (BN shared)": {"freeze_blocks": -1, "bn_mode": "shared"},
}


def _training_setup(cfg, data, work: Path, *, cached: bool):  # noqa: ANN001, ANN202
    """(train-one-epoch callable, seconds to build its inputs): the model and inputs local training would use."""
    from fedrad.client.cache import MEMORY
    from fedrad.client.features import n_views, site_inputs
    from fedrad.client.train import fit, pick_device, pixel_inputs
    from fedrad.common.model import build_model

    device = pick_device(cfg.device)
    model = build_model(cfg, device)
    run_cfg = cfg.replace(local_epochs=1, feature_cache=cached)
    MEMORY.clear()
    start = time.perf_counter()
    inputs = site_inputs(model, run_cfg, data, work, device).train if cached else \
        pixel_inputs(model, data.x_train, n_views(cfg), device)
    build = time.perf_counter() - start

    def epoch(seed: int) -> float:
        return fit(model, inputs, data.y_train, run_cfg, seed=seed, device=device)["seconds"]

    return epoch, build


def epoch_seconds(cfg, data, work: Path, *, epochs: int = 5) -> dict[str, Any]:  # noqa: ANN001
    """Median epoch seconds with and without the feature cache, their ratio, the cache's build time.

    The two kinds of epoch alternate (uncached, cached, uncached, ...) after one warm-up
    epoch each, which also pays the process's one-off costs (the first optimizer step
    imports `torch._dynamo`, ~2 s): on a shared machine the speed drifts by 10-20 % within a minute, and
    measuring all uncached epochs first, then all cached ones, put that drift into the
    ratio (the same commit measured 4.4x and 6.0x in two runs).
    """
    uncached, _ = _training_setup(cfg, data, work, cached=False)
    cached, build = _training_setup(cfg, data, work, cached=True)
    uncached(0)  # the warm-up pair, not timed
    cached(0)
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for seed in range(1, epochs + 1):
        times["uncached"].append(uncached(seed))
        times["cached"].append(cached(seed))
    u, c = float(np.median(times["uncached"])), float(np.median(times["cached"]))
    n = len(data.y_train)
    return {"epoch_seconds_uncached": u, "epoch_seconds_cached": c, "cache_speedup": u / c,
            "cache_speedup_per_pair": [round(a / b, 2) for a, b in zip(times["uncached"], times["cached"])],
            "images_per_second": n / c, "images_per_second_uncached": n / u, "cache_build_seconds": build}


def reply_bytes(cfg) -> int:
    """Serialised size of a site's train reply under `cfg` (shared arrays + scalar metrics + name)."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedrad.common.finetune import shared_keys
    from fedrad.common.model import build_model
    from fedrad.common.records import ARRAYS, METRICS, SITE, payload_bytes, to_array_record

    model = build_model(cfg)
    content = RecordDict({ARRAYS: to_array_record(model.state_dict(), shared_keys(model, cfg.bn_mode)),
                          METRICS: MetricRecord({"num-examples": 100, "train-loss": 0.5, "n-train": 100,
                                                 "n-test": 40, "n-skipped": 0, "seconds": 1.0}),
                          SITE: ConfigRecord({"name": "site-a"})})
    return payload_bytes(content)


def full_model_bytes(cfg) -> int:
    from flwr.app import RecordDict

    from fedrad.common.model import build_model
    from fedrad.common.records import ARRAYS, payload_bytes, to_array_record

    state = build_model(cfg).state_dict()
    return payload_bytes(RecordDict({ARRAYS: to_array_record(state, list(state))}))


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure_simulate(data: Path, out: Path, extra: list[str] | None = None) -> dict[str, float]:
    """Run `fedrad simulate` as a child process; wall time and peak RSS of its process tree."""
    cmd = [sys.executable, "-m", "fedrad.cli", "simulate", "--data", str(data), "--out", str(out), *(extra or [])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            stop.wait(0.25)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    _, err = proc.communicate()
    stop.set()
    thread.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fedrad simulate failed (exit {proc.returncode}):\n{err[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"simulate_wall_seconds": round(wall, 2), "simulate_peak_rss_mb": round(peak / 2**20, 1),
            "simulate_min_auc": min(s["auc"] for s in report["sites"] if s["auc"] is not None)}


def run_bench(data: Path, out: Path, *, simulate: bool = True, progress=print) -> dict[str, Any]:  # noqa: ANN001
    from fedrad.client.dataset import load_site
    from fedrad.client.reference import raw_preprocessor
    from fedrad.common.config import RunConfig, project_run_config
    from fedrad.common.sites import discover_sites

    cfg = RunConfig.from_run_config(project_run_config())
    site_dir = discover_sites(data)[0]
    site = load_site(site_dir, raw_preprocessor(cfg))
    results: dict[str, Any] = {"site": site.name, "n_train": len(site.y_train), "freeze_blocks": cfg.freeze_blocks,
                               "augment": cfg.augment, "image_px": cfg.image_size}
    with tempfile.TemporaryDirectory() as work:
        progress("local training with and without the feature cache, alternating epochs ...")
        results.update(epoch_seconds(cfg, site, Path(work)))
    progress("bytes per round for each strategy ...")
    results["bytes_per_round"] = {name: reply_bytes(cfg.replace(**knobs)) for name, knobs in STRATEGIES.items()}
    results["full_model_bytes"] = full_model_bytes(cfg)
    if simulate:
        progress("default simulation (this takes a minute) ...")
        with tempfile.TemporaryDirectory() as sim_out:
            results.update(measure_simulate(data, Path(sim_out)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    return results
