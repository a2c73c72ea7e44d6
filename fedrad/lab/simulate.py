"""`fedrad simulate`: N virtual hospitals on this machine, in Flower's Simulation Engine.

One virtual SuperNode per site folder (partition i = i-th site folder, sorted by name), the
real ServerApp and ClientApp, Ray as Flower's simulation backend: a Ray instance started for the run on this machine, or an
existing (multi-node) Ray cluster given by its address (`ray_address`; README "Past one machine").
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fedrad.common.config import RunConfig
from fedrad.common.sites import discover_sites


def backend_config(*, num_cpus: int, cpus_per_site: float = 1.0, ray_address: str | None = None
                   ) -> dict[str, Any]:
    """Flower's Ray backend config: `init_args` go to `ray.init` as they are (flwr 1.42's RayBackend).

    With `ray_address` ("HOST:PORT" of a running cluster's head, or "auto" for one started on
    this machine with `ray start --head`) Ray connects to that cluster instead of starting
    its own, and its CPUs are the cluster's: Ray refuses `num_cpus` when it connects, so
    `num_cpus` is left out and the cluster's size decides how many sites train at once
    (each still asks for `cpus_per_site`).
    """
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True, "include_dashboard": False}
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args.update(num_cpus=num_cpus, num_gpus=0)
    return {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0}, "init_args": init_args}


def simulate(cfg: RunConfig, *, num_cpus: int | None = None, cpus_per_site: float = 1.0,
             resume: bool = False, ray_address: str | None = None) -> dict[str, Any]:
    """Run the federation on the site folders under `cfg.data_dir`; return the report dict.

    `num_cpus` caps what Ray may use (default: all cores); each site gets `cpus_per_site`,
    so `num_cpus / cpus_per_site` sites train at the same time. A simulation starts from
    round 1 unless `resume` asks to go on from the checkpoint in `cfg.out_dir`.
    `ray_address` runs the virtual sites on an existing Ray cluster instead (`num_cpus` is
    then the cluster's); its nodes must see `cfg.data_dir` and `cfg.out_dir` at the same
    paths and have fedrad installed (README "Past one machine").
    """
    from flwr.simulation import run_simulation

    from fedrad.client.app import app as client_app
    from fedrad.lab.synth import load_truth
    from fedrad.server.app import build_server_app
    from fedrad.server.checkpoint import checkpoint_path

    sites = discover_sites(Path(cfg.data_dir))
    num_cpus = num_cpus or os.cpu_count() or 1
    # Each site runs torch with as many threads as it has cores, not the whole machine's.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(cpus_per_site))))
    report_path = Path(cfg.out_dir) / "report.json"
    report_path.unlink(missing_ok=True)  # a stale report must not pass for this run's
    if not resume:
        checkpoint_path(cfg.out_dir).unlink(missing_ok=True)
    start = time.perf_counter()
    run_simulation(
        server_app=build_server_app(cfg, load_truth(cfg.data_dir)),
        client_app=client_app,
        num_supernodes=len(sites),
        backend_config=backend_config(num_cpus=num_cpus, cpus_per_site=cpus_per_site, ray_address=ray_address),
    )
    if not report_path.is_file():
        raise RuntimeError(f"The simulation ended without a report at {report_path}; see the log above for the "
                           "failing site or coordinator error.")
    report = json.loads(report_path.read_text())
    report["simulate_wall_seconds"] = round(time.perf_counter() - start, 2)
    report_path.write_text(json.dumps(report, indent=2))
    return report
