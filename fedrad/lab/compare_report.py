"""compare.json / compare.md / compare.png: per-seed results in, mean ± sd over seeds out.

compare.json follows the issue's schema, ``{"runs": [{"strategy", "sites": [{"name", "auc",
"balanced_accuracy", "ece", "bytes_sent_per_round"}], "wall_seconds"}], "leave_one_out":
[{"site", "pooled_bn_auc", "adabn_auc"}]}``, where every number is the mean over seeds; extra
keys carry the sd (``auc_sd``), the per-seed values (``auc_seeds``) and the paired gaps
behind the headline claims. Seed variance can exceed method gaps (FLamby), so each gap is
computed per seed (same seed, same splits) and reported as mean ± sd of the differences.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.lab.compare_plan import BY_NAME, ComparePlan

METRICS = ("auc", "balanced_accuracy", "ece")
HIGHER_IS_BETTER = {"auc": True, "balanced_accuracy": True, "ece": False}
WITHIN_POOLED = 0.02  # the tolerance: fedbn within 0.02 AUC of pooled


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _clean(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def finite_mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd (ddof 1; 0 for one value) of the finite values; None when there are none."""
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return None, None
    return float(np.mean(ok)), float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """`finite_mean_sd`, rounded to 6 decimals for compare.json."""
    mean, sd = finite_mean_sd(values)
    return _clean(mean), _clean(sd)


def _by_seed(results: list[dict[str, Any]], kind: str, name: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in results if r["name"] == name and (r["kind"] == "loso") == (kind == "loso")}


def summarize_strategy(spec: Any, runs: dict[int, dict[str, Any]], sites: list[str]) -> dict[str, Any]:
    """One entry of compare.json's "runs": per site mean ± sd over seeds."""
    seeds = sorted(runs)
    rows = []
    for site in sites:
        per_seed = [next(s for s in runs[seed]["sites"] if s["name"] == site) for seed in seeds]
        row: dict[str, Any] = {"name": site, "n_train": per_seed[0].get("n_train"), "n_test": per_seed[0].get("n_test")}
        for metric in METRICS:
            values = [_num(s[metric]) for s in per_seed]
            row[metric], row[f"{metric}_sd"] = mean_sd(values)
            row[f"{metric}_seeds"] = [_clean(v) for v in values]
        sent = [s["bytes_sent_per_round"] for s in per_seed]
        row["bytes_sent_per_round"] = None if any(b is None for b in sent) else round(float(np.mean(sent)))
        rows.append(row)
    entry: dict[str, Any] = {"strategy": spec.name, "description": spec.what, "config_changes": spec.changes,
                             "sites": rows, "seeds": seeds,
                             "lr_chosen": runs[seeds[0]].get("lr_chosen") if seeds else None}
    for metric in METRICS:  # the mean over sites, per seed, then mean ± sd over seeds
        per_seed_mean = [float(np.nanmean([_num(s[metric]) for s in runs[seed]["sites"]])) for seed in seeds]
        entry[f"mean_{metric}"], entry[f"mean_{metric}_sd"] = mean_sd(per_seed_mean)
    walls = [float(runs[seed]["wall_seconds"]) for seed in seeds]
    entry["wall_seconds"], entry["wall_seconds_sd"] = mean_sd(walls)
    entry["wall_seconds"] = round(entry["wall_seconds"], 1)
    return entry


def summarize_loso(runs: dict[int, dict[str, Any]], site: str, reference: dict[str, Any] | None) -> dict[str, Any]:
    """One entry of compare.json's "leave_one_out"."""
    seeds = sorted(runs)
    entry: dict[str, Any] = {"site": site, "seeds": seeds, "trained_on": runs[seeds[0]]["trained_on"]}
    for label, key in (("pooled_bn", "pooled_bn"), ("adabn", "adabn")):
        for metric, source in (("auc", "auc"), ("balanced_accuracy", "balanced-accuracy"), ("ece", "ece")):
            values = [_num(runs[seed][key][source]) for seed in seeds]
            entry[f"{label}_{metric}"], entry[f"{label}_{metric}_sd"] = mean_sd(values)
            entry[f"{label}_{metric}_seeds"] = [_clean(v) for v in values]
    walls = [float(runs[seed]["wall_seconds"]) for seed in seeds]
    entry["wall_seconds"] = round(float(np.mean(walls)), 1)
    if reference is not None:  # the same site when it trained in the federation (same bn-mode)
        row = next(s for s in reference["sites"] if s["name"] == site)
        entry["in_federation_auc"], entry["in_federation_auc_sd"] = row["auc"], row["auc_sd"]
    return entry


def paired_gap(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], site: str) -> dict[str, Any]:
    """AUC(a) - AUC(b) at `site`, per seed both ran; mean ± sd of the differences."""
    seeds = sorted(set(a) & set(b))

    def auc(runs: dict[int, dict[str, Any]], seed: int) -> float:
        return _num(next(s for s in runs[seed]["sites"] if s["name"] == site)["auc"])

    diffs = [auc(a, s) - auc(b, s) for s in seeds]
    mean, sd = mean_sd(diffs)
    return {"site": site, "mean": mean, "sd": sd, "per_seed": [_clean(d) for d in diffs], "seeds": seeds}


def gaps(results: list[dict[str, Any]], strategies: list[str], sites: list[str], smallest: str | None,
         shifted: list[str]) -> list[dict[str, Any]]:
    """The issue's three claims as paired gaps: holds (the mean) and beyond_sd (the mean clears its sd)."""
    runs = {name: _by_seed(results, "strategy", name) for name in strategies}
    out = []

    def add(claim: str, a: str, b: str, site: str, threshold: float, inclusive: bool = False) -> None:
        if a in runs and b in runs and runs[a] and runs[b]:
            gap = paired_gap(runs[a], runs[b], site)
            mean = None if gap["mean"] is None else round(gap["mean"], 3)  # AUC to 3 decimals, as displayed
            holds = mean is not None and (mean >= threshold if inclusive else mean > threshold)
            # One seed has no spread to clear: nothing is claimed beyond an sd that was never measured.
            beyond = holds and len(gap["seeds"]) > 1 and mean - threshold > (gap["sd"] or 0.0)
            out.append({"claim": claim, "a": a, "b": b, **gap, "threshold": threshold, "holds": holds,
                        "beyond_sd": beyond})

    for site in sites:
        add(f"fedbn within {WITHIN_POOLED} AUC of pooled", "fedbn", "pooled", site, -WITHIN_POOLED, inclusive=True)
    if smallest:
        add("fedbn above local on the smallest site", "fedbn", "local", smallest, 0.0)
    for site in shifted:
        add("fedbn above fedavg-full on a most-shifted site", "fedbn", "fedavg-full", site, 0.0)
    return out


def summarize(plan: ComparePlan, results: list[dict[str, Any]], *, wall_seconds: float) -> dict[str, Any]:
    """compare.json's content from the plan and every job's result."""
    runs = [summarize_strategy(BY_NAME[name], _by_seed(results, "strategy", name), plan.sites)
            for name in plan.strategies]
    by_name = {r["strategy"]: r for r in runs}
    loso = [summarize_loso(_by_seed(results, "loso", site), site, by_name.get(plan.loso_bn_mode))
            for site in plan.sites] if plan.loso else []
    sizes = {s["name"]: s["n_train"] for r in runs for s in r["sites"] if s.get("n_train") is not None}
    smallest = min(sizes, key=lambda k: sizes[k]) if sizes else None
    shift = _shift_scores(results)
    shifted = sorted(shift, key=lambda k: -shift[k])[:max(1, len(shift) // 2)] if shift else []
    data_dir = Path(plan.base.data_dir)
    truth = json.loads((data_dir / "truth.json").read_text()) if (data_dir / "truth.json").is_file() else None
    return {
        "runs": runs,
        "leave_one_out": loso,
        "gaps": gaps(results, plan.strategies, plan.sites, smallest, shifted),
        "seeds": plan.seeds,
        "rounds": plan.base.num_server_rounds,
        "local_epochs": plan.base.local_epochs,
        "freeze_blocks": plan.base.freeze_blocks,
        "loso_bn_mode": plan.loso_bn_mode if plan.loso else None,
        "engine": "flower",  # every federated job runs in Flower's Simulation Engine
        "data_dir": str(data_dir),
        "sites": plan.sites,
        "smallest_site": smallest,
        "bn_shift_scores": shift,
        "bn_shift_source": _shift_source(results),
        "most_shifted_sites": shifted,
        # series data (`fedrad synth --kind series`) has no 2-D spacing or kernel: those are None
        "scanners": [{k: s.get(k) for k in ("name", "n_patients", "prevalence", "spacing_mm", "noise_hu", "kernel",
                                            "hu_offset")} for s in truth["sites"]] if truth else None,
        "lr_tuning": plan.tuned,  # {} when the rates were not tuned (--no-tune)
        "wall_seconds": round(wall_seconds, 1),
        "results": results,  # every job's raw result, per seed
    }


def _shift_source(results: list[dict[str, Any]]) -> str | None:
    names = [r["name"] for r in results if r.get("shift_scores")]
    for preferred in ("full", "fedavg-full", "fedbn", "silobn"):
        if preferred in names:
            return preferred
    return names[0] if names else None


def _shift_scores(results: list[dict[str, Any]]) -> dict[str, float]:
    """Per-site BN shift score, averaged over seeds, from the run whose BN covers most of the network."""
    source = _shift_source(results)
    if source is None:
        return {}
    per_seed = [r["shift_scores"] for r in results if r["name"] == source and r.get("shift_scores")]
    return {site: round(float(np.mean([s[site] for s in per_seed if site in s])), 4) for site in per_seed[0]}


# ---- rendering ---------------------------------------------------------------------------------

def _pm(mean: float | None, sd: float | None, digits: int = 3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:.{digits}f}"


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cells and a best-in-column mask for the strategy table (shared by markdown and rich)."""
    sites = summary["sites"]
    header = ["strategy", *[f"{s} AUC" for s in sites], "mean AUC", "mean bal. acc.", "mean ECE", "bytes/round",
              "wall s/run", "lr-max"]
    columns: list[tuple[list[float | None], bool]] = []  # (values per run, higher is better)
    cells = []
    for run in summary["runs"]:
        row = [run["strategy"]]
        for s in run["sites"]:
            row.append(_pm(s["auc"], s["auc_sd"]))
        row += [_pm(run["mean_auc"], run["mean_auc_sd"]), _pm(run["mean_balanced_accuracy"],
                                                               run["mean_balanced_accuracy_sd"]),
                _pm(run["mean_ece"], run["mean_ece_sd"])]
        sent = [s["bytes_sent_per_round"] for s in run["sites"]]
        row.append("images move" if any(b is None for b in sent) else f"{int(np.mean(sent)):,}")
        row.append(f"{run['wall_seconds']:.0f}")
        row.append("–" if run.get("lr_chosen") is None else f"{run['lr_chosen']:g}")
        cells.append(row)
    for i in range(len(sites)):
        columns.append(([r["sites"][i]["auc"] for r in summary["runs"]], True))
    columns += [([r["mean_auc"] for r in summary["runs"]], True),
                ([r["mean_balanced_accuracy"] for r in summary["runs"]], True),
                ([r["mean_ece"] for r in summary["runs"]], False)]
    best = [[False] * len(header) for _ in cells]
    for j, (values, higher) in enumerate(columns, start=1):
        finite = [v for v in values if v is not None]
        if not finite:
            continue
        target = max(finite) if higher else min(finite)
        for i, v in enumerate(values):
            best[i][j] = v is not None and round(v, 3) == round(target, 3)
    return header, cells, best


def to_markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    header, cells, best = table_rows(summary)
    lines = [
        "# fedrad compare", "",
        f"{len(summary['runs'])} strategies × {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
        f"{summary['rounds']} rounds × {summary['local_epochs']} local epochs, partial fine-tuning at "
        f"freeze-blocks {summary['freeze_blocks']}, engine `{summary['engine']}`, data `{summary['data_dir']}`; "
        f"{summary['wall_seconds'] / 60:.1f} min wall in all.", "",
        "## Test AUC per site", "",
        "Mean ± sd over seeds; **bold** = best in the column (AUC, balanced accuracy: highest; ECE: lowest). "
        "A gap smaller than the sd is not a gap.", "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for row, mask in zip(cells, best):
        lines.append("| " + " | ".join(f"**{c}**" if b else c for c, b in zip(row, mask)) + " |")
    lines += ["", "| strategy | what it is |", "|---|---|"]
    lines += [f"| {r['strategy']} | {r['description']} |" for r in summary["runs"]]
    tuned = summary.get("lr_tuning") or {}
    if "lr_from" in tuned:  # --lr-from: the rates an earlier compare chose; no tuning here
        lines += ["", "lr-max per strategy as an earlier compare chose it (`--lr-from`; not tuned on this data): "
                  + ", ".join(f"{name} {lr:g}" for name, lr in tuned["lr_from"].items()) + "."]
    elif tuned:
        grid = next(iter(tuned.values()))["grid"]
        lines += ["", "## lr-max chosen on a validation split", "",
                  "Each strategy ran once per rate (first seed) on a copy of the data whose validation rows (25 % "
                  "of each site's labelled training rows) stand in for the test split; the rate with the best mean "
                  "validation AUC over sites was used for every seed above. The test split took no part.", "",
                  "| strategy | " + " | ".join(f"{lr:g}" for lr in grid) + " | chosen |",
                  "|---|" + "---:|" * (len(grid) + 1)]
        lines += [f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in t["validation_auc"])
                  + f" | {t['lr_chosen']:g} |" for name, t in tuned.items()]
    else:
        lines += ["", "Every strategy ran at the config's lr-max (not tuned: `--no-tune`)."]
    if summary["leave_one_out"]:
        mode = summary["loso_bn_mode"]
        lines += ["", f"## Leave-one-site-out ({mode} federation without the site)", "",
                  "The held-out site evaluates the global model on its test split, normalising with the pooled BN "
                  "statistics of the training sites or with AdaBN on its own training images (no labels).", "",
                  f"| held-out site | pooled BN AUC | AdaBN AUC | pooled BN ECE | AdaBN ECE | in the federation "
                  f"({mode}) |", "|---|---:|---:|---:|---:|---:|"]
        for e in summary["leave_one_out"]:
            pooled, ada = e["pooled_bn_auc"], e["adabn_auc"]
            mark = (lambda v, other: f"**{_pm(v, None)}**" if v is not None and other is not None and v >= other
                    else _pm(v, None))
            lines.append(f"| {e['site']} | {mark(pooled, ada)} ± {e['pooled_bn_auc_sd']:.3f} | "
                         f"{mark(ada, pooled)} ± {e['adabn_auc_sd']:.3f} | {_pm(e['pooled_bn_ece'], e['pooled_bn_ece_sd'])} | "
                         f"{_pm(e['adabn_ece'], e['adabn_ece_sd'])} | "
                         f"{_pm(e.get('in_federation_auc'), e.get('in_federation_auc_sd'))} |")
    if summary["gaps"]:
        lines += ["", "## The claims, as paired gaps", "",
                  "AUC(a) − AUC(b) per seed (same seed, same splits), mean ± sd. *holds*: the mean clears the "
                  "threshold; *beyond sd*: by more than the sd (never with a single seed).", "",
                  "| claim | site | a − b | holds | beyond sd |", "|---|---|---:|:---:|:---:|"]
        for g in summary["gaps"]:
            lines.append(f"| {g['claim']} | {g['site']} | {g['mean']:+.3f} ± {g['sd']:.3f} | "
                         f"{'yes' if g['holds'] else 'no'} | {'yes' if g['beyond_sd'] else 'no'} |")
    lines += ["", "## Sites", ""]
    shift = summary["bn_shift_scores"]
    if shift:
        lines.append(f"BN shift score = mean KL divergence between a site's BN statistics and the pooled ones "
                     f"(from the `{summary['bn_shift_source']}` runs); most shifted: "
                     f"{', '.join(summary['most_shifted_sites'])}. Smallest site: {summary['smallest_site']}.")
        lines.append("")
    scanners = {s["name"]: s for s in summary["scanners"] or []}
    lines += ["| site | n train | n test | spacing mm | kernel | noise HU | HU offset | prevalence | BN shift |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    first = summary["runs"][0]["sites"] if summary["runs"] else []
    for s in first:
        sc = scanners.get(s["name"], {})
        lines.append(f"| {s['name']} | {s['n_train']} | {s['n_test']} | {sc.get('spacing_mm', '–')} | "
                     f"{sc.get('kernel', '–')} | {sc.get('noise_hu', '–')} | {sc.get('hu_offset', '–')} | "
                     f"{sc.get('prevalence', '–')} | {shift.get(s['name'], '–')} |")
    lines += ["", "![AUC per site and strategy](compare.png)", ""]
    return "\n".join(lines)


def plot_compare(summary: dict[str, Any], path: Path) -> None:
    """One figure: per-site AUC by strategy (bars ± sd) and, beside it, leave-one-site-out pooled BN vs AdaBN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loso = summary["leave_one_out"]
    fig, axes = plt.subplots(1, 2 if loso else 1, figsize=(12 if loso else 8, 4),
                             gridspec_kw={"width_ratios": [3, 1.3]} if loso else None, squeeze=False)
    ax = axes[0][0]
    sites, runs = summary["sites"], summary["runs"]
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(sites) + 1)
    for i, run in enumerate(runs):
        means = [_num(s["auc"]) for s in run["sites"]] + [_num(run["mean_auc"])]
        sds = [_num(s["auc_sd"]) for s in run["sites"]] + [_num(run["mean_auc_sd"])]
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=sds, capsize=2, label=run["strategy"])
    ax.set_xticks(x, [*sites, "mean"])
    ax.set_ylabel("test AUC (mean ± sd over seeds)")
    ax.set_ylim(0.5, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    ax.set_title(f"Strategies, {len(summary['seeds'])} seeds, {summary['rounds']} rounds")
    if loso:
        ax = axes[0][1]
        xs = np.arange(len(loso))
        for k, (key, label) in enumerate((("pooled_bn", "pooled BN"), ("adabn", "AdaBN"))):
            ax.bar(xs - 0.2 + 0.4 * k, [_num(e[f"{key}_auc"]) for e in loso], 0.4,
                   yerr=[_num(e[f"{key}_auc_sd"]) for e in loso], capsize=2, label=label)
        ax.set_xticks(xs, [e["site"] for e in loso])
        ax.set_ylim(0.5, 1.0)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title("Unseen site (leave-one-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_compare(summary: dict[str, Any], out: Path) -> Path:
    """Write compare.json, compare.md and compare.png into `out`; return the json path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    (out / "compare.md").write_text(to_markdown(summary))
    plot_compare(summary, out / "compare.png")
    return out / "compare.json"


def rich_table(summary: dict[str, Any]) -> Any:
    """The strategy table for the terminal, best per column in bold green."""
    from rich.table import Table

    header, cells, best = table_rows(summary)
    table = Table(title=f"fedrad compare · {len(summary['seeds'])} seeds · {summary['rounds']} rounds · "
                        f"{summary['wall_seconds'] / 60:.1f} min")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row, mask in zip(cells, best):
        table.add_row(*[f"[bold green]{c}[/]" if b else c for c, b in zip(row, mask)])
    return table
