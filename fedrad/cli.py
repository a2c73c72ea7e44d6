"""`fedrad`: the user's entry point. Each subcommand parses its flags and calls one function.

    fedrad synth --out data/synthetic          # built-in multi-center DICOM data
    fedrad simulate --out runs/demo            # federated run in Flower's Simulation Engine
    fedrad compare --out runs/compare          # every strategy side by side (fedrad/lab/compare_cli.py)
    fedrad provision | coordinator | register | site | submit   # a real deployment (fedrad/cli_deploy.py)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

# Before anything loads torch (and its OpenMP): waiting threads sleep rather than spin (on a busy
# 2-core machine spinning threads starve each other; measured 30-60x slower small convolutions).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fedrad.cli_deploy import add_deploy_commands  # noqa: E402
from fedrad.cli_site import add_site_commands  # noqa: E402
from fedrad.common.config import load_run_config as load_config  # noqa: E402
from fedrad.lab.compare_cli import add_compare_parser  # noqa: E402
from fedrad.lab.synth import DEFAULT_DATA, make_synthetic  # noqa: E402


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


def cmd_synth(args: argparse.Namespace) -> int:
    if args.kind == "series":  # CT series + SEG / RTSTRUCT / NIfTI masks + survival (fedrad.lab.synth_series)
        from fedrad.lab.synth_series import make_series

        if args.legacy:
            raise SystemExit("fedrad synth: --legacy applies to --kind slices only.")
        make_series(args.out, seed=args.seed, n_patients=args.patients)
        return 0
    if args.patients is not None:
        raise SystemExit("fedrad synth: --patients applies to --kind series only.")
    make_synthetic(args.out, seed=args.seed, legacy=args.legacy)
    return 0


def config_with_data(args: argparse.Namespace) -> "RunConfig":  # noqa: F821
    """The run config with `--run-config` overrides, `--data` (default: the built-in data, generated if absent
    with the run's seed) and `--rounds`: what every command that runs federations starts from."""
    cfg = load_config(args.run_config)
    data = args.data or DEFAULT_DATA
    if args.data is None and not data.is_dir():
        make_synthetic(data, seed=cfg.seed)
    changes = {"data_dir": str(data.resolve())}
    if args.rounds is not None:
        changes["num_server_rounds"] = args.rounds
    return cfg.replace(**changes)


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedrad.lab.simulate import simulate

    cfg = config_with_data(args).replace(out_dir=str(args.out.resolve()))
    report = simulate(cfg, num_cpus=args.cpus, resume=args.resume, ray_address=args.ray_address)
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
                  f"report: {args.out / 'report.md'}", soft_wrap=True)  # a path to copy: never wrapped
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedrad.lab.shift_study import run_shift_study

    console = Console()
    study = run_shift_study(config_with_data(args), args.out.resolve(), seeds=range(args.seeds), method=args.method,
                            num_cpus=args.cpus, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    table = Table(title=f"fedrad shift · harmonize off vs {study['method']} · mean over {len(study['seeds'])} seed(s)")
    for col in ("site", "spacing mm", "shift pretrained off→on", "shift last round off→on", "AUC off→on"):
        table.add_column(col, justify="left" if col == "site" else "right")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for s in study["sites"]:
        table.add_row(s["name"], f"{s['spacing_mm'].get('median', 0):.2f}", f"{fmt(s['pre_off'])} → {fmt(s['pre_on'])}",
                      f"{fmt(s['final_off'])} → {fmt(s['final_on'])}", f"{fmt(s['auc_off'])} → {fmt(s['auc_on'])}")
    console.print(table)
    console.print(f"written: {args.out / 'shift.json'}, {args.out / 'shift.md'}", soft_wrap=True)
    return 0


def cmd_dp(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedrad.lab.dp_study import run_dp_study

    noises = [float(v) for v in args.noise.split(",") if v.strip()]
    console = Console()
    study = run_dp_study(config_with_data(args), args.out.resolve(), noises=noises, seeds=range(args.seeds),
                         clip=args.clip, num_cpus=args.cpus, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    console.print((args.out / "dp.md").read_text(), markup=False)
    console.print(f"written: {args.out / 'dp.json'}, {args.out / 'dp.md'} ({len(study['runs'])} runs)", soft_wrap=True)
    return 0


def cmd_survival(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedrad.lab.survival_study import run_survival_study

    if args.data is None:
        raise SystemExit("fedrad survival: give --data, a folder of sites with time and event "
                         "(e.g. from `fedrad synth --kind series --out DIR`)")
    console = Console()
    args.run_config = ["task='survival'", *(args.run_config or [])]  # first, so survival-only keys are accepted
    study = run_survival_study(config_with_data(args), args.out.resolve(), seeds=range(args.seeds),
                               tolerance=args.tolerance, num_cpus=args.cpus, resume=args.resume,
                               progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    console.print((args.out / "survival.md").read_text(), markup=False)
    console.print(f"written: {args.out / 'survival.json'}, {args.out / 'survival.md'} ({len(study['runs'])} seeds)",
                  soft_wrap=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedrad.lab.bench import run_bench

    if args.virtual_sites is not None and args.virtual_sites < 1:  # 0 would otherwise run the default benchmark
        raise SystemExit(f"fedrad bench: --virtual-sites {args.virtual_sites}: give at least 1 site.")
    if args.patients is None:  # --deploy's sites default to 40 patients, --virtual-sites' tiny ones to 16
        args.patients = 16 if args.virtual_sites else 40
    if args.virtual_sites:  # many tiny virtual sites in the Simulation Engine (fedrad.lab.scale_bench)
        from fedrad.lab.scale_bench import main as virtual_main

        return virtual_main(args)
    if args.deploy and args.tiny_sites and args.data is None:  # many daemons on one machine: tiny sites
        from fedrad.lab.deploy_bench import main as deploy_main
        from fedrad.lab.scale_bench import tiny_sites_folder

        with tiny_sites_folder(args.sites, patients=args.patients) as args.data:
            return deploy_main(args)
    if args.deploy:  # a real deployment on loopback instead (fedrad.lab.deploy_bench)
        from fedrad.lab.deploy_bench import main as deploy_main

        return deploy_main(args)
    console = Console()
    data = args.data or DEFAULT_DATA
    if args.data is None and not data.is_dir():
        make_synthetic(data)
    results = run_bench(data, args.out, simulate=not args.no_simulate,
                        progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    table = Table(title=f"fedrad bench · {results['site']} ({results['n_train']} training images, "
                        f"{results['image_px']} px, freeze-blocks {results['freeze_blocks']})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if key == "bytes_per_round":
            for name, n in value.items():
                table.add_row(f"bytes_per_round · {name}", f"{n:,}")
        elif isinstance(value, float):
            table.add_row(key, f"{value:,.3f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            table.add_row(key, f"{value:,}")
        elif isinstance(value, list):
            table.add_row(key, ", ".join(str(v) for v in value))
    console.print(table)
    console.print(f"written: {args.out / 'bench.json'}", soft_wrap=True)
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from fedrad.lab.gpu_bench import main as gpu_main

    return gpu_main(args)


def cmd_deploy_table(args: argparse.Namespace) -> int:
    from fedrad.lab.deploy_table import Checks, deploy_table

    checks = Checks(max_prior_error=args.max_prior_error, min_unlabelled=args.min_unlabelled,
                    max_ratio=args.max_ratio, min_gap=args.min_gap)
    md, data = deploy_table(args.runs, checks)
    print(md)
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


def add_study_arguments(p: argparse.ArgumentParser, *, out: str) -> None:
    """The flags every multi-seed study shares (`fedrad shift`, `fedrad dp`)."""
    p.add_argument("--data", type=Path, default=None,
                   help=f"folder with one sub-folder per site (default: {DEFAULT_DATA}, generated if absent)")
    p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default: {out})")
    p.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default: 3)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds per run (run-config num-server-rounds)")
    p.add_argument("--run-config", action="append", default=[], metavar="\"k=v ...\"",
                   help="override [tool.flwr.app.config] keys for every run")
    p.add_argument("--cpus", type=int, default=None, help="CPU cores each simulation may use (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrad", description="Federated transfer learning for medical imaging (Flower + PyTorch).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fedrad synth --out data/synthetic\n  fedrad simulate --out runs/demo\n"
               "  fedrad simulate --data /exports/hospitals --run-config \"freeze-blocks=12 num-server-rounds=10\"")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, Flower's INFO log too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the built-in synthetic multi-center CT data set (DICOM + labels.csv)",
                       description="Write 5 synthetic hospital sites (different scanners, noise, kernels, HU "
                                   "offsets, prevalence and one labelling rule) as real DICOM files plus "
                                   "labels.csv per site, and truth.json (the simulation's true priors). At "
                                   "site-a and site-b the unlabelled (deployment) images have another prevalence "
                                   "than the labelled ones, and a labelled deployment evaluation set is written "
                                   "to deploy-audit.csv, which a site reads only to score its corrections.",
                       epilog="examples:\n  fedrad synth --out data/synthetic --seed 1\n"
                              "  fedrad synth --kind series --out data/series   # 3 sites of CT series, "
                              "masks (SEG, RTSTRUCT, NIfTI), time + event",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per site)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--legacy", action="store_true",
                   help="the data before deployment shift (no deploy-audit.csv; unlabelled rows drawn from each "
                        "site's labelled population): reproduces figures measured on it byte for byte")
    p.add_argument("--kind", choices=("slices", "series"), default="slices",
                   help="slices (default): the 5-site 2-D data; series: 3 sites of CT series (24-64 slices of "
                        "1.25/2.5/5 mm, one site JPEG 2000), 3-D lesions, masks as DICOM SEG / RTSTRUCT / NIfTI, "
                        "labels plus survival time and event, truth.json with the true risk model")
    p.add_argument("--patients", type=int, default=None, help="--kind series: patients per site (default 160)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("simulate", help="run the federation in Flower's Simulation Engine and write a report",
                       description="One virtual hospital per site folder; the coordinator averages the shared "
                                   "head and keeps BatchNorm per site. Writes OUT/report.json, report.md, "
                                   "report.png.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  fedrad simulate --out runs/demo\n"
                              "  fedrad simulate --data my_sites --out runs/mine --rounds 10\n"
                              "  fedrad simulate --run-config \"freeze-blocks=17 lr-max=0.01\"  # linear probe\n"
                              "  fedrad simulate --data /shared/sites --out /shared/runs/x --ray-address 10.0.0.5:6379")
    p.add_argument("--data", type=Path, default=None,
                   help=f"folder with one sub-folder per site (default: {DEFAULT_DATA}, generated if absent)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="report folder (default: runs/latest)")
    p.add_argument("--rounds", type=int, default=None, help="number of federated rounds (run-config num-server-rounds)")
    p.add_argument("--run-config", action="append", default=[], metavar="\"k=v ...\"",
                   help="override [tool.flwr.app.config] keys, e.g. \"freeze-blocks=12 lr-max=0.001\"")
    p.add_argument("--cpus", type=int, default=None, help="CPU cores the simulation may use (default: all)")
    p.add_argument("--resume", action="store_true", help="go on from OUT's checkpoint instead of round 1")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="run the virtual sites on this running Ray cluster (its head's address, or 'auto' for one "
                        "started here with `ray start --head`) instead of a Ray instance of its own; every node must "
                        "see --data and --out at the same paths (README: Past one machine). --cpus is then ignored")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("shift", help="harmonisation off vs on, per seed: shift table and each site's AUC side by side",
                       description="Runs the federation with harmonize=off and harmonize=METHOD for each seed "
                                   "(sites share one feature cache) and writes OUT/shift.json and shift.md: per "
                                   "site spacing, intensity summary, shift score off/on and test AUC off/on, "
                                   "means over the seeds.",
                       epilog="example: fedrad shift --out runs/shift --seeds 3 --method median")
    add_study_arguments(p, out="runs/shift")
    p.add_argument("--method", default="median", choices=["quantile", "landmarks", "median"],
                   help="harmonisation of the 'on' runs (default: median)")
    p.set_defaults(func=cmd_shift)

    p = sub.add_parser("dp", help="differential privacy's cost: AUC per site at several noise levels, over seeds",
                       description="A benchmark, not a test: for each seed, one federation without DP and one per "
                                   "noise multiplier (dp-clip fixed), sites sharing one feature cache. Writes "
                                   "OUT/dp.json and dp.md: mean ± sd test AUC per site and setting, epsilon at "
                                   "dp-delta, and the sites' update norms before clipping. 3 seeds x 5 settings "
                                   "of the default run take about 25 min on 2 cores.",
                       epilog="example: fedrad dp --out runs/dp --noise 0,0.5,1,2 --seeds 3 --clip 4  # as measured in BENCHMARKS.md")
    add_study_arguments(p, out="runs/dp")
    p.add_argument("--noise", default="0,0.5,1,2", help="comma-separated dp-noise multipliers (default: 0,0.5,1,2)")
    p.add_argument("--clip", type=float, default=1.0, help="dp-clip: the update's L2 norm bound (default: 1.0)")
    p.set_defaults(func=cmd_dp)

    p = sub.add_parser("survival", help="survival check: per site federated vs the same site alone vs the "
                                        "true-risk ceiling, over seeds",
                       description=textwrap.fill(  # raw formatting keeps the epilog's lines: wrap this by hand
                                   "A benchmark, not a test (issue 18's check): for each seed, one federation with "
                                   "task=survival and each site trained alone on the same schedule (nothing sent), "
                                   "sites sharing one work folder. Writes OUT/survival.json and survival.md: per "
                                   "site the test C-index, federated and alone, per seed and mean ± sd, the "
                                   "ceiling from truth.json (simulated data), whether the federated C-index is "
                                   "within --tolerance of it and above the site alone in every seed, "
                                   "c_index_federated and bytes per round. With run config covariates, also the "
                                   "baseline without the CNN: a Cox model on the covariates alone, per site and "
                                   "pooled. --resume reuses finished runs in OUT.", 79),
                       epilog="examples:\n  fedrad synth --kind series --out data/series && "
                              "fedrad survival --data data/series --out runs/survival --seeds 3\n"
                              "  fedrad survival --data data/series --out runs/survival-cov --seeds 3 "
                              "--run-config \"covariates='log-volume,asphericity,hu-sd'\"",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(p, out="runs/survival")
    p.add_argument("--tolerance", type=float, default=0.03,
                   help="how far below the ceiling a site's federated C-index may be (default: 0.03)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs already finished in OUT with the same run config")
    p.set_defaults(func=cmd_survival)

    p = sub.add_parser("bench", help="measure cached vs uncached epochs, bytes per round, simulation time/memory",
                       description="Writes OUT/bench.json and prints a table: epoch_seconds_uncached, "
                                   "epoch_seconds_cached, images_per_second, bytes_per_round per strategy, "
                                   "full_model_bytes, simulate_wall_seconds, simulate_peak_rss_mb.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  fedrad bench --out runs/bench\n"
                              "  fedrad bench --deploy --out runs/bench-deploy\n"
                              "  fedrad bench --virtual-sites 100 --out runs/bench-100")
    p.add_argument("--data", type=Path, default=None, help=f"site folders (default: {DEFAULT_DATA})")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="where bench.json goes (default: runs/bench)")
    p.add_argument("--no-simulate", action="store_true", help="skip the (minute-long) default simulation")
    p.add_argument("--deploy", action="store_true",
                   help="instead: a secure deployment on loopback (coordinator + site daemons, TLS, node auth), "
                        "deploy_round_seconds / deploy_site_compute_seconds / deploy_overhead_seconds, and the same "
                        "run simulated (--data: site folders to use; default: --sites synthetic ones)")
    p.add_argument("--virtual-sites", type=int, default=None, metavar="N",
                   help="instead: N tiny synthetic sites (--patients each, 96 px) in the Simulation Engine for "
                        "--rounds rounds (or the sites in --data): round times, wall time, peak memory of the whole "
                        "simulation (PSS over its process tree, also per role), per-site AUCs; run config default "
                        "\"local-epochs=1 batch-size=8 fov-mm=32.0\"")
    p.add_argument("--rounds", type=int, default=5, help="--deploy, --virtual-sites: rounds (default 5)")
    p.add_argument("--sites", type=int, default=3, help="--deploy: synthetic sites (default 3)")
    p.add_argument("--tiny-sites", action="store_true",
                   help="--deploy: the synthetic sites are tiny (96-px slices, --patients each, a site policy of "
                        "min-count 2 so that they train), as for 16 daemons on one machine")
    p.add_argument("--patients", type=int, default=None,
                   help="patients per synthetic site (default: 40 with --deploy, 16 with --virtual-sites)")
    p.add_argument("--poll-interval", type=float, default=0.25, help="--deploy: the sites' poll interval (default 0.25)")
    p.add_argument("--cold", action="store_true", help="--deploy: sites in Flower's own mode (a process per message, "
                                                       "3 s polls) instead of warm")
    p.add_argument("--run-config", action="append", default=[], metavar="\"k=v ...\"",
                   help="--deploy: run-config overrides for both runs; --virtual-sites: the run config")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("deploy-table", help="the deployment label-shift table over runs: per seed, mean ± sd per "
                                            "data draw, issue 16's checks",
                       description="Reads the report.json of finished `fedrad simulate` runs (nothing is re-run), "
                                   "groups them by data folder (one draw of the data) and prints, per site with a "
                                   "deployment evaluation set, the five corrections (none, labelled prior, EM, BBSE, "
                                   "oracle prior): prior used, ECE, Brier, balanced accuracy as mean ± sd over the "
                                   "runs; the ratio ECE EM / ECE labelled and EM's prior error per run; and how many "
                                   "site-runs meet each check.",
                       epilog="example: fedrad deploy-table runs/i16-d0-s0 runs/i16-d0-s1 runs/i16-d0-s2 "
                              "--json runs/i16-table.json")
    p.add_argument("runs", type=Path, nargs="+", help="run folders (or their report.json)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    p.add_argument("--max-prior-error", type=float, default=0.05, help="EM prior check tolerance (default 0.05)")
    p.add_argument("--min-unlabelled", type=int, default=300,
                   help="judge the EM prior check at sites with at least this many unlabelled images (default 300)")
    p.add_argument("--max-ratio", type=float, default=0.5, help="ECE EM / ECE labelled target (default 0.5)")
    p.add_argument("--min-gap", type=float, default=0.25,
                   help="judge the ratio where labelled and deployment priors differ by this much (default 0.25)")
    p.set_defaults(func=cmd_deploy_table)

    p = sub.add_parser("bench-gpu", help="GPU benchmark: local-training images/s vs bare forward+backward images/s",
                       description="On one NVIDIA GPU (bf16, channels-last): images/s of fedrad's local training "
                                   "on cached prefix features beside the bare forward+backward of the same "
                                   "trainable part at the same batch size, and of full fine-tuning. Runs on the "
                                   "CPU too (slowly) with --device cpu.",
                       epilog="example: fedrad bench-gpu --image-size 224 --batch-size 256 --out runs/gpu")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=4096, help="training images in the synthetic cache")
    p.add_argument("--freeze-blocks", type=int, default=14)
    p.add_argument("--steps", type=int, default=30, help="timed steps of the bare loops")
    p.add_argument("--out", type=Path, default=Path("runs/gpu"))
    p.set_defaults(func=cmd_bench_gpu)
    add_deploy_commands(sub)

    add_compare_parser(sub)
    add_site_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as err:
        logging.getLogger("fedrad").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
