"""fedrad ServerApp: the coordinator. Wiring only: config -> initial shared weights -> FedRad -> report.

`flwr run` (Simulation or Deployment Engine) enters through `app`; `fedrad simulate` builds
the same federation with `build_server_app(cfg)` because Flower's in-process
`run_simulation` does not read pyproject's run config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from client.train import build_model
from common.config import RunConfig
from common.finetune import shared_keys
from common.records import ARRAYS, payload_bytes, to_array_record, to_numpy
from server.aggregate import spec_of
from server.reference import exchange_reference, needed
from server.report import build_report, write_report
from server.shift_report import harmonization_section
from server.shift_tracking import FedRadShift
from server.strategy import SiteLog

log = logging.getLogger("fedrad.coordinator")


def log_round(server_round: int, sites: dict[str, SiteLog]) -> None:
    """One progress line per round: each site's test AUC."""
    parts = []
    for name in sorted(sites):
        auc = sites[name].evaluate.get(server_round, {}).get("auc")
        parts.append(f"{name} {auc:.3f}" if auc is not None else f"{name} –")
    log.info("round %d finished · test AUC: %s", server_round, " · ".join(parts))


def run_federation(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg.num_server_rounds` rounds of FedRad and write the report to `cfg.out_dir`."""
    start = time.perf_counter()
    exchange = exchange_reference(grid, cfg) if needed(cfg) else None  # intensity reference, round-0 shift
    cfg = exchange.cfg if exchange is not None else cfg  # with spacing-mm = 0 the chosen spacing
    model = build_model(cfg)
    state = model.state_dict()
    keys = shared_keys(model, cfg.bn_mode)
    initial = to_array_record(state, keys)
    full_model_bytes = payload_bytes(RecordDict({ARRAYS: to_array_record(state, list(state))}))
    strategy = FedRadShift(broadcast=exchange.broadcast() if exchange is not None else None,
                           expected=spec_of(to_numpy(initial)), min_sites=cfg.min_sites, on_round=log_round)
    run_config = ConfigRecord(cfg.to_run_config())
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_server_rounds,
                   timeout=cfg.round_timeout, train_config=run_config, evaluate_config=ConfigRecord(run_config))
    report = build_report(cfg, strategy.sites, wall_seconds=time.perf_counter() - start,
                          full_model_bytes=full_model_bytes,
                          shared_payload_bytes=sum(a.nbytes for a in to_numpy(initial).values()),
                          rejected=strategy.rejected, failed=strategy.failed)
    if exchange is not None:
        report["harmonization"] = harmonization_section(exchange, strategy.shift)
        exchange.save(Path(cfg.out_dir))
    path = write_report(report, Path(cfg.out_dir))
    log.info("report written to %s", path)
    return report


def build_server_app(cfg: RunConfig) -> ServerApp:
    """A ServerApp bound to an explicit config (for in-process simulation)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_run_config(context.run_config))
