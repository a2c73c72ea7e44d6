"""The run report: report.json (machine-readable), report.md (the per-site table), report.png.

Built only from what reached the coordinator: per-site aggregates and measured reply sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedrad.common.config import RunConfig
from fedrad.common.dp import epsilon
from fedrad.common.records import RELIABILITY_BINS
from fedrad.server.label_shift import markdown_section, site_fields, training_prior
from fedrad.server.report_html import write_html
from fedrad.server.shift_report import harmonization_markdown
from fedrad.server.strategy import SiteLog
from fedrad.server.survival_report import federated_fields, survival_fields, survival_markdown


def _clean(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (e.g. AUC with one class) is null."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def site_row(site: SiteLog, truth: dict[str, Any] | None = None) -> dict[str, Any]:
    last_eval = site.evaluate[max(site.evaluate)] if site.evaluate else {}
    last_train = site.train[max(site.train)] if site.train else {}
    sent = list(site.bytes_sent.values())
    return {
        "name": site.name,
        "n_train": int(last_train.get("n-train", 0)),
        "n_test": int(last_eval.get("num-examples", last_train.get("n-test", 0))),
        "n_skipped": int(last_train.get("n-skipped", 0)),
        "auc": _clean(last_eval.get("auc", math.nan)),
        "balanced_accuracy": _clean(last_eval.get("balanced-accuracy", math.nan)),
        "ece": _clean(last_eval.get("ece", math.nan)),
        "bytes_sent_per_round": round(sum(sent) / len(sent)) if sent else 0,
        "rounds_trained": len(site.train),
        "history": [{"round": r, "auc": _clean(m.get("auc", math.nan)), "ece": _clean(m.get("ece", math.nan)),
                     "train_loss": _clean(site.train.get(r, {}).get("train-loss", math.nan))}
                    for r, m in sorted(site.evaluate.items())],
        **site_fields(site.name, last_eval, truth),
        # what the site kept back, over the run: aggregate -> reason code (its policy, or too few images)
        "withheld": {what: code for r in sorted(site.withheld) for what, code in site.withheld[r].items()},
        "reliability": reliability(last_eval),
    }


def reliability(metrics: Mapping[str, float]) -> dict[str, list[list[float] | None]]:
    """The test split's reliability diagrams before and after correction, as the site sent them.

    Per bin of P(malignant): [images, mean predicted, fraction positive], or None where the
    bin was empty or held fewer images than the site's min-count (it does not send those).
    """
    out = {}
    for name in ("uncorrected", "corrected"):
        bins = []
        for b in range(RELIABILITY_BINS):
            parts = [metrics.get(f"rel-{name}-{b}-{part}") for part in ("n", "conf", "pos")]
            bins.append(None if any(v is None or not math.isfinite(v) for v in parts) else [float(v) for v in parts])
        if any(bins):
            out[name] = bins
    return out


def build_report(cfg: RunConfig, sites: dict[str, SiteLog], *, wall_seconds: float, full_model_bytes: int,
                 shared_payload_bytes: int, rejected: list, failed: list,
                 truth: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The report dict. `truth` (simulation only, from the lab): per-site ground truth by site name."""
    truth = truth or {}
    prior = training_prior(s.train[max(s.train)] for s in sites.values() if s.train)
    rows = [{**site_row(sites[name], truth.get(name)), **survival_fields(cfg, sites[name], truth.get(name))}
            for name in sorted(sites)]
    return {
        "strategy": f"{cfg.bn_mode}, freeze-blocks={cfg.freeze_blocks}",
        "rounds": cfg.num_server_rounds,
        "wall_seconds": round(wall_seconds, 2),
        "full_model_bytes": full_model_bytes,
        "shared_payload_bytes": shared_payload_bytes,
        "config": cfg.to_run_config(),
        "sites": rows,
        **federated_fields(cfg, rows),  # task = survival: c_index_federated from the sites' pair counts
        "prior_train": None if prior is None else float(prior[1]),  # P(malignant) the federation trained on
        "rejected_updates": [{"round": r, "site": s, "reason": why} for r, s, why in rejected],
        "failed_replies": [{"round": r, "site": s, "reason": why} for r, s, why in failed],
        **dp_fields(cfg, sites),
    }


def dp_fields(cfg: RunConfig, sites: dict[str, SiteLog]) -> dict[str, Any]:
    """With differential privacy on: its settings and epsilon at dp-delta over the rounds trained."""
    if cfg.dp_clip <= 0:
        return {}
    rounds = max((max(s.train) for s in sites.values() if s.train), default=0)
    return {"dp_clip": cfg.dp_clip, "dp_noise": cfg.dp_noise, "dp_delta": cfg.dp_delta, "dp_rounds": rounds,
            "dp_epsilon": _clean(epsilon(cfg.dp_noise, rounds, cfg.dp_delta))}  # null: no noise, no guarantee


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# fedrad run report", "",
        f"Strategy **{report['strategy']}**, {report['rounds']} rounds, {report['wall_seconds']:.1f} s wall time.",
        f"Each site sent {report['sites'][0]['bytes_sent_per_round'] if report['sites'] else 0:,} bytes a round "
        f"(shared payload {report['shared_payload_bytes']:,} bytes raw); a full-model FedAvg exchange would send "
        f"{report['full_model_bytes']:,} bytes.", "",
        "| site | n train | n test | skipped | AUC | balanced acc. | ECE | bytes sent / round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["sites"]:
        lines.append(f"| {s['name']} | {s['n_train']} | {s['n_test']} | {s['n_skipped']} | {_fmt(s['auc'])} | "
                     f"{_fmt(s['balanced_accuracy'])} | {_fmt(s['ece'])} | {s['bytes_sent_per_round']:,} |")
    if "dp_epsilon" in report:
        lines += ["", f"Differential privacy on the shared update: clip {report['dp_clip']:g}, noise multiplier "
                      f"{report['dp_noise']:g}, {report['dp_rounds']} rounds: **epsilon {_fmt(report['dp_epsilon'])}** "
                      f"at delta {report['dp_delta']:g} (site-level; BN statistics and other aggregates carry no "
                      "noise)."]
    withheld = [(s["name"], s["withheld"]) for s in report["sites"] if s.get("withheld")]
    if withheld:
        lines += ["", "## Withheld by the sites", ""] + [
            f"- {name}: " + ", ".join(f"{what} ({code})" for what, code in sorted(kept.items())) for name, kept in withheld]
    for title, key in (("Rejected updates", "rejected_updates"), ("Failed replies", "failed_replies")):
        if report[key]:
            lines += ["", f"## {title}", ""] + [f"- round {e['round']}, {e['site']}: {e['reason']}" for e in report[key]]
    lines += markdown_section(report)
    lines += survival_markdown(report)
    if "harmonization" in report:
        lines += [""] + harmonization_markdown(report["harmonization"])
    lines += ["", "![AUC per round](report.png)", ""]
    return "\n".join(lines)


def plot_history(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s in report["sites"]:
        rounds = [h["round"] for h in s["history"]]
        ax.plot(rounds, [h["auc"] if h["auc"] is not None else math.nan for h in s["history"]], marker="o",
                label=s["name"])
    ax.set_xlabel("round")
    ax.set_ylabel("test AUC")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Per-site test AUC ({report['strategy']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write report.json, report.md, report.png and report.html into out_dir; return the json path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    markdown = to_markdown(report)
    (out_dir / "report.md").write_text(markdown)
    plot_history(report, out_dir / "report.png")
    write_html(report, markdown, out_dir)  # report.html: the same, self-contained (plots embedded)
    return path
