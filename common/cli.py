"""`fedrad`: the user's entry point. Each subcommand parses its flags and calls one function.

    fedrad synth --out data/synthetic          # built-in multi-center DICOM data
    fedrad simulate --out runs/demo            # federated run in Flower's Simulation Engine
    fedrad compare --out runs/compare          # every strategy side by side (server/compare_cli.py)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_DATA = Path("data/synthetic")


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 160  # keep one progress line per round unwrapped in log files
    handler = RichHandler(console=console, show_path=False, markup=False, log_time_format="%H:%M:%S")
    for name in ("fedrad",):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)


def make_synthetic(out: Path, *, seed: int = 0) -> list[Path]:
    """Generate the default synthetic sites into `out`, with a progress bar."""
    from rich.progress import Progress

    from common.synth import default_sites, generate

    specs = default_sites()
    with Progress(transient=True) as progress:
        task = progress.add_task(f"writing synthetic DICOM to {out}", total=len(specs))
        folders = generate(out, sites=specs, seed=seed, on_site_done=lambda name, n: progress.advance(task))
    total = sum(s.n_patients for s in specs)
    logging.getLogger("fedrad").info("wrote %d sites, %d patients, to %s", len(folders), total, out)
    return folders


def cmd_synth(args: argparse.Namespace) -> int:
    make_synthetic(args.out, seed=args.seed)
    return 0


def load_config(overrides: Sequence[str]) -> "RunConfig":  # noqa: F821
    """pyproject's [tool.flwr.app.config], then `--run-config "k=v ..."` overrides, as a RunConfig."""
    from flwr.common.config import parse_config_args

    from common.config import RunConfig, project_run_config

    values = project_run_config()
    values.update(parse_config_args(list(overrides)) if overrides else {})
    return RunConfig.from_run_config(values)


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from server.simulate import simulate

    cfg = load_config(args.run_config)
    data = args.data
    if data is None:
        data = DEFAULT_DATA
        if not data.is_dir():
            make_synthetic(data, seed=cfg.seed)
    changes = {"data_dir": str(data.resolve()), "out_dir": str(args.out.resolve())}
    if args.rounds is not None:
        changes["num_server_rounds"] = args.rounds
    cfg = cfg.replace(**changes)
    report = simulate(cfg, num_cpus=args.cpus)
    table = Table(title=f"fedrad simulate · {report['strategy']} · {report['rounds']} rounds · "
                        f"{report['simulate_wall_seconds']:.0f} s")
    for col in ("site", "n train", "n test", "AUC", "bal. acc.", "ECE", "bytes/round"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for s in report["sites"]:
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(s["name"], str(s["n_train"]), str(s["n_test"]), fmt(s["auc"]), fmt(s["balanced_accuracy"]),
                      fmt(s["ece"]), f"{s['bytes_sent_per_round']:,}")
    console = Console()
    console.print(table)
    console.print(f"full-model FedAvg would send {report['full_model_bytes']:,} bytes a round; "
                  f"report: {args.out / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrad", description="Federated transfer learning for medical imaging (Flower + PyTorch).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fedrad synth --out data/synthetic\n  fedrad simulate --out runs/demo\n"
               "  fedrad simulate --data /exports/hospitals --run-config \"freeze-blocks=12 num-server-rounds=10\"")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, Flower's INFO log too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the built-in synthetic multi-center CT data set (DICOM + labels.csv)",
                       description="Write 4 synthetic hospital sites (different scanners, noise, kernels, HU "
                                   "offsets and prevalence) as real DICOM files plus labels.csv per site.",
                       epilog="example: fedrad synth --out data/synthetic --seed 1")
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per site)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("simulate", help="run the federation in Flower's Simulation Engine and write a report",
                       description="One virtual hospital per site folder; the coordinator averages the shared "
                                   "head and keeps BatchNorm per site. Writes OUT/report.json, report.md, "
                                   "report.png.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  fedrad simulate --out runs/demo\n"
                              "  fedrad simulate --data my_sites --out runs/mine --rounds 10\n"
                              "  fedrad simulate --run-config \"freeze-blocks=17 lr-max=0.01\"  # linear probe")
    p.add_argument("--data", type=Path, default=None,
                   help=f"folder with one sub-folder per site (default: {DEFAULT_DATA}, generated if absent)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="report folder (default: runs/latest)")
    p.add_argument("--rounds", type=int, default=None, help="number of federated rounds (run-config num-server-rounds)")
    p.add_argument("--run-config", action="append", default=[], metavar="\"k=v ...\"",
                   help="override [tool.flwr.app.config] keys, e.g. \"freeze-blocks=12 lr-max=0.001\"")
    p.add_argument("--cpus", type=int, default=None, help="CPU cores the simulation may use (default: all)")
    p.set_defaults(func=cmd_simulate)

    from server.compare_cli import add_compare_parser

    add_compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        logging.getLogger("fedrad").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
