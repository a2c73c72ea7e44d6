"""`fedrad dp`: what differential privacy on the shared update costs in AUC, per site, over seeds.

For each noise multiplier (and a run without DP as the baseline) and each seed, one
federation on the same data: `dp-clip` fixed, `dp-noise` varied. All runs share one work
folder for the sites, so the frozen prefix is computed once. The result, `dp.json` and
`dp.md`, gives per site the mean ± sd test AUC at each noise, epsilon at `dp-delta` over
the rounds, and the sites' update norms before clipping (from their own summaries, read
here because the lab runs the sites; in a deployment they stay at each site).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedrad.common.config import RunConfig
from fedrad.common.dp import epsilon
from fedrad.lab.compare_report import finite_mean_sd
from fedrad.lab.simulate import simulate


def run_dp_study(cfg: RunConfig, out_dir: Path, *, noises: Sequence[float], seeds: Sequence[int], clip: float,
                 num_cpus: int | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the baseline and every noise for every seed; write and return the study (`dp.json`, `dp.md`)."""
    if clip <= 0:
        raise ValueError(f"--clip must be > 0; got {clip}.")
    out_dir = Path(out_dir)
    base = cfg.replace(work_dir=str(out_dir / "sites"), dp_clip=clip)
    settings = [None, *noises]  # None: no DP at all (dp-clip 0)
    runs = []
    for seed in seeds:
        for noise in settings:
            name = "no-dp" if noise is None else f"noise-{noise:g}"
            progress(f"seed {seed}, {name}")
            run_cfg = base.replace(seed=seed, out_dir=str(out_dir / f"seed-{seed}-{name}"),
                                   **({"dp_clip": 0.0} if noise is None else {"dp_noise": float(noise)}))
            report = simulate(run_cfg, num_cpus=num_cpus)
            runs.append({"seed": seed, "noise": noise, "sites": {s["name"]: s["auc"] for s in report["sites"]},
                         "epsilon": report.get("dp_epsilon")})
    study = summarise(runs, settings, base)
    study["norms"] = update_norms(out_dir / "sites")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dp.json").write_text(json.dumps(study, indent=2))
    (out_dir / "dp.md").write_text(to_markdown(study))
    return study


def summarise(runs: list[dict[str, Any]], settings: Sequence[float | None], cfg: RunConfig) -> dict[str, Any]:
    """Per site and setting: mean and sd of the test AUC over seeds; epsilon per setting."""
    sites = sorted({name for run in runs for name in run["sites"]})
    rows = []
    for noise in settings:
        chosen = [r for r in runs if r["noise"] == noise]
        eps = None if noise is None else epsilon(float(noise), cfg.num_server_rounds, cfg.dp_delta)
        rows.append({"noise": noise, "epsilon": eps if eps is None or math.isfinite(eps) else None,
                     "auc": {s: dict(zip(("mean", "sd"), finite_mean_sd([r["sites"].get(s) for r in chosen])))
                             for s in sites}})
    return {"clip": cfg.dp_clip, "delta": cfg.dp_delta, "rounds": cfg.num_server_rounds, "sites": sites,
            "seeds": sorted({r["seed"] for r in runs}), "rows": rows, "runs": runs}


def update_norms(work_root: Path) -> dict[str, float]:
    """Each site's last update norm before clipping, from the site summaries in the shared work folder."""
    out = {}
    for summary in sorted(Path(work_root).glob("*/site-summary.json")):
        value = json.loads(summary.read_text()).get("dp-update-norm")
        if value is not None:
            out[summary.parent.name] = float(value)
    return out


def to_markdown(study: dict[str, Any]) -> str:
    def cell(auc: dict[str, float | None]) -> str:
        return "–" if auc["mean"] is None else f"{auc['mean']:.3f} ± {auc['sd']:.3f}"

    lines = ["# fedrad dp: AUC vs noise", "",
             f"dp-clip {study['clip']:g}, {study['rounds']} rounds, seeds {study['seeds']}; epsilon at delta "
             f"{study['delta']:g} (site-level, RDP accountant). Mean ± sd test AUC over the seeds.", "",
             "| setting | epsilon | " + " | ".join(study["sites"]) + " |",
             "|---|---:|" + "---:|" * len(study["sites"])]
    for row in study["rows"]:
        name = "no DP" if row["noise"] is None else f"noise {row['noise']:g}"
        eps = "–" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        if row["noise"] == 0:
            eps = "∞ (clip only)"
        lines.append(f"| {name} | {eps} | " + " | ".join(cell(row["auc"][s]) for s in study["sites"]) + " |")
    if study.get("norms"):
        lines += ["", "Update norm before clipping, last round of the last run: "
                  + ", ".join(f"{site} {norm:.3g}" for site, norm in study["norms"].items()) + "."]
    return "\n".join(lines) + "\n"
