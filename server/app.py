"""fedrad ServerApp: the coordinator. Wiring only: config -> initial shared weights -> FedRad -> report.

`flwr run` (Simulation or Deployment Engine) enters through `app`; `fedrad simulate` builds
the same federation with `build_server_app(cfg)` because Flower's in-process
`run_simulation` does not read pyproject's run config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrad.common.config import RunConfig
from fedrad.common.finetune import shared_keys, site_bn_stat_keys
from fedrad.common.model import build_model
from fedrad.common.records import ARRAYS, FEDERATION_ID, config_record, payload_bytes, to_array_record, to_numpy
from fedrad.server.aggregate import spec_of
from fedrad.server.checkpoint import Checkpointer, checkpoint_path
from fedrad.server.global_model import restore_registry, save_global_model
from fedrad.server.reference import exchange_reference, needed
from fedrad.server.report import build_report, write_report
from fedrad.server.rounds import PhaseClock, run_rounds
from fedrad.server.shift_report import harmonization_section
from fedrad.server.shift_tracking import FedRadShift
from fedrad.server.strategy import SiteLog

log = logging.getLogger("fedrad.coordinator")


def log_round(server_round: int, sites: dict[str, SiteLog]) -> None:
    """One progress line per round: each site's test AUC."""
    parts = []
    for name in sorted(sites):
        auc = sites[name].evaluate.get(server_round, {}).get("auc")
        parts.append(f"{name} {auc:.3f}" if auc is not None else f"{name} –")
    log.info("round %d finished · test AUC: %s", server_round, " · ".join(parts))


def run_federation(grid: Grid, cfg: RunConfig, truth: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Run `cfg.num_server_rounds` rounds of FedRad and write the report to `cfg.out_dir`.

    `truth` (simulation only: the lab reads the generator's ground truth and hands it over)
    puts the true priors beside the sites' estimates in the report.

    After every round the state is checkpointed under `cfg.out_dir`; a coordinator started
    again on the same out-dir and experiment goes on after the last finished round.
    """
    checkpoints = Checkpointer(checkpoint_path(cfg.out_dir), cfg.to_run_config())  # also starts the clock
    exchange = exchange_reference(grid, cfg) if needed(cfg) else None  # intensity reference, round-0 shift
    cfg = exchange.cfg if exchange is not None else cfg  # with spacing-mm = 0 the chosen spacing
    model = build_model(cfg)
    state = model.state_dict()
    keys = shared_keys(model, cfg.bn_mode)
    initial = to_array_record(state, keys)
    full_model_bytes = payload_bytes(RecordDict({ARRAYS: to_array_record(state, list(state))}))
    bn_expected = spec_of(to_numpy(to_array_record(state, site_bn_stat_keys(model))))  # what sites report
    strategy = FedRadShift(broadcast=exchange.broadcast() if exchange is not None else None,
                           expected=spec_of(to_numpy(initial)), min_sites=cfg.min_sites,
                           norm_outlier_factor=cfg.norm_outlier_factor, on_round=log_round, bn_expected=bn_expected,
                           weight_cap=cfg.weight_cap, bn_shrink=cfg.bn_shrink if cfg.bn_mode != "shared" else 0.0)
    arrays = checkpoints.restore(strategy, initial)
    if exchange is not None:  # the node -> site bindings made before round 1 hold for the run
        strategy.node_names.update(exchange.names)
    restore_registry(strategy.bn_registry, Path(cfg.out_dir), checkpoints.done)
    run_config = config_record(cfg.to_run_config(), {FEDERATION_ID: checkpoints.federation_id})
    strategy.summary()

    clock = PhaseClock()

    def end_of_round(server_round: int, arrays: ArrayRecord) -> None:
        checkpoints.save(server_round, arrays, strategy)
        save_global_model(Path(cfg.out_dir), server_round=server_round, shared=to_numpy(arrays),
                          registry=strategy.bn_registry, config=cfg.to_run_config(),
                          run_id=checkpoints.federation_id)

    run_rounds(grid, strategy, arrays, first=checkpoints.done + 1, last=cfg.num_server_rounds,
               timeout=cfg.round_timeout, train_config=run_config, evaluate_config=ConfigRecord(run_config),
               rejoin_wait=cfg.rejoin_wait, asked_before=exchange.asked if exchange is not None else None,
               on_round_end=end_of_round, clock=clock)
    report = build_report(cfg, strategy.sites, wall_seconds=checkpoints.wall_seconds(),
                          full_model_bytes=full_model_bytes,
                          shared_payload_bytes=sum(a.nbytes for a in to_numpy(initial).values())
                          + sum(math.prod(s.shape) * s.dtype.itemsize for s in bn_expected.values()),
                          rejected=strategy.rejected, failed=strategy.failed, truth=truth)
    report["round_seconds"] = {str(r): s for r, s in sorted(checkpoints.round_seconds.items())}
    report["round_phase_seconds"] = {str(r): p for r, p in sorted(clock.rounds.items())}  # this run's rounds
    report["bn_registry"] = strategy.bn_registry.summary()  # per site: round, image count (stats: global.npz)
    if exchange is not None:
        report["harmonization"] = harmonization_section(exchange, strategy.shift)
        exchange.save(Path(cfg.out_dir))
    path = write_report(report, Path(cfg.out_dir))
    log.info("report written to %s", path)
    return report


def build_server_app(cfg: RunConfig, truth: Mapping[str, Mapping[str, Any]] | None = None) -> ServerApp:
    """A ServerApp bound to an explicit config (and, in simulation, the data's truth) for in-process runs."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, truth)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_run_config(context.run_config))
