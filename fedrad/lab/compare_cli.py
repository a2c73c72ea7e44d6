"""`fedrad compare`: the subcommand's flags and what it prints (the work is in `fedrad.lab.compare`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

STRATEGY_NAMES = "local,pooled,fedavg-full,fedbn,silobn,linear-probe,full,full-discriminative"


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """Register `compare` on the `fedrad` command's subparsers."""
    p = sub.add_parser(
        "compare", help="every transfer strategy side by side on the same sites and seeds, plus leave-one-site-out",
        description="Runs local, pooled, fedavg-full, fedbn, silobn, linear-probe, full and full-discriminative on "
                    "the same sites, splits and seeds, and leave-one-site-out for each site (pooled BN vs AdaBN). "
                    "First each strategy's lr-max is chosen from --lr-grid on a validation split carved from the "
                    "sites' training rows (never the test split); full and fedavg-full train every layer at that "
                    "one rate, full-discriminative at lr-decay 0.5. compare.json records lr_chosen per run. Writes "
                    "OUT/compare.json, compare.md (mean ± sd over seeds, best per column marked) and compare.png; "
                    "each run's own report lies under OUT/runs/<strategy>/seed-<s>/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fedrad compare --out runs/compare     # defaults: about 2 h on 2 cores (estimated: 32 tuning runs "
               "+ 24 runs + 15 leave-outs; the 46 min measured before tuning had 21 runs + 15 leave-outs)\n"
               "  fedrad compare --no-tune --out runs/compare   # without tuning: ~1 h\n"
               "  fedrad compare --data data/synthetic-s1 --lr-from runs/compare/compare.json --out runs/compare-s1"
               "   # a second draw at the first one's rates\n"
               "  fedrad compare --seeds 1 --rounds 2 --strategies fedbn,local --no-loso --no-tune   # a quick look\n"
               "  fedrad compare --data /exports/hospitals --out runs/mine")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with one sub-folder per site (default: data/synthetic, generated if absent)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per strategy: seed, seed+1, ... (default: 3)")
    p.add_argument("--rounds", type=int, default=None, help="rounds for every strategy (run-config num-server-rounds)")
    p.add_argument("--strategies", default=STRATEGY_NAMES, help=f"comma-separated subset of {STRATEGY_NAMES}")
    p.add_argument("--no-loso", action="store_true", help="skip leave-one-site-out")
    p.add_argument("--lr-grid", default="3e-4,1e-3,3e-3,1e-2",
                   help="rates each strategy's lr-max is chosen from, on the validation split (default: "
                        "3e-4,1e-3,3e-3,1e-2)")
    p.add_argument("--no-tune", action="store_true",
                   help="skip the tuning: every strategy at the config's lr-max (faster; the comparison is then "
                        "only as fair as that one rate)")
    p.add_argument("--lr-from", type=Path, default=None, metavar="COMPARE_JSON",
                   help="no tuning runs: each strategy's lr-max as an earlier compare chose it (its compare.json), "
                        "e.g. to run a second draw of the data at the rates tuned on the first")
    p.add_argument("--resume", action="store_true",
                   help="reuse every job (tuning included) that already finished in OUT with the same config: an "
                        "interrupted compare goes on, and a compare of more strategies reuses a smaller one's runs")
    p.add_argument("--loso-bn-mode", default="silobn", choices=("silobn", "fedbn", "shared"),
                   help="bn-mode of the leave-one-site-out federations (default: silobn, whose global model "
                        "carries the BN affine parameters)")
    p.add_argument("--run-config", action="append", default=[], metavar="\"k=v ...\"",
                   help="override [tool.flwr.app.config] keys for every strategy, e.g. \"local-epochs=1\"")
    p.set_defaults(func=cmd_compare)


def _job_line(job: object, result: dict) -> str:
    name = f"{'leave-out ' if result['kind'] == 'loso' else ''}{result['name']} seed {result['seed']}"
    if getattr(job, "tuning", False):
        name = f"tuning {result['name']} lr-max {result['lr_chosen']:g} (validation)"
    if result["kind"] == "loso":
        detail = (f"pooled BN AUC {result['pooled_bn']['auc']:.3f} · AdaBN AUC {result['adabn']['auc']:.3f}")
    else:
        detail = " · ".join(f"{s['name']} {s['auc']:.3f}" if s["auc"] is not None else f"{s['name']} –"
                            for s in result["sites"])
    return f"{name}: {detail} ({result['wall_seconds']:.0f} s)"


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedrad.common.config import load_run_config
    from fedrad.lab.compare import compare
    from fedrad.lab.compare_plan import plan_compare
    from fedrad.lab.compare_report import rich_table
    from fedrad.lab.lr_tuning import parse_grid, rates_from
    from fedrad.lab.synth import DEFAULT_DATA, make_synthetic

    log = logging.getLogger("fedrad.compare")
    cfg = load_run_config(args.run_config)
    data = args.data
    if data is None:
        data = DEFAULT_DATA
        if not data.is_dir():
            make_synthetic(data, seed=0)
    changes = {"data_dir": str(data.resolve()), "out_dir": str(args.out.resolve())}
    if args.rounds is not None:
        changes["num_server_rounds"] = args.rounds
    cfg = cfg.replace(**changes)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    plan = plan_compare(cfg, out=args.out.resolve(), seeds=args.seeds, strategies=strategies,
                        loso=not args.no_loso, loso_bn_mode=args.loso_bn_mode,
                        lr_grid=() if args.no_tune or args.lr_from else parse_grid(args.lr_grid))
    if args.lr_from is not None:
        try:
            plan.preset = rates_from(args.lr_from, [*strategies, *([args.loso_bn_mode] if plan.loso else [])])
        except ValueError as err:
            log.error("%s", err)
            return 2
    logging.getLogger("fedrad.coordinator").setLevel(logging.WARNING)  # one line per job, not per round
    handlers = logging.getLogger("fedrad").handlers
    console = getattr(handlers[0], "console", None) if handlers else None
    console = console or Console(stderr=True)
    log.info("%d jobs: %s × seeds %s%s, each in Flower's Simulation Engine", len(plan.jobs),
             ", ".join(plan.strategies), plan.seeds, f" + leave-one-out of {len(plan.sites)} sites" if plan.loso else "")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("fedrad compare", total=len(plan.tuning) + len(plan.jobs))

        def on_done(job: object, result: dict) -> None:
            progress.advance(task)
            log.info("%s", _job_line(job, result))

        summary = compare(plan, on_done=on_done, resume=args.resume)
    out = Console()
    if not out.is_terminal:
        out.width = 200  # a log file gets the whole table on one line per strategy
    out.print(rich_table(summary))
    for e in summary["leave_one_out"]:
        out.print(f"leave-one-out {e['site']}: pooled BN AUC {e['pooled_bn_auc']:.3f} ± {e['pooled_bn_auc_sd']:.3f}"
                  f" · AdaBN AUC {e['adabn_auc']:.3f} ± {e['adabn_auc_sd']:.3f}")
    for g in summary["gaps"]:
        out.print(f"{g['claim']} ({g['site']}): {g['mean']:+.3f} ± {g['sd']:.3f} → "
                  f"{'holds' if g['holds'] else 'does not hold'}{' beyond sd' if g['beyond_sd'] else ''}")
    out.print(f"wrote {args.out / 'compare.json'}, compare.md, compare.png ({summary['wall_seconds'] / 60:.1f} min)")
    return 0
