"""The report's survival part (`task = survival`): per-site C-index, td-AUC, IBS, and the federated C-index.

Built only from what the sites sent: scalars and Harrell's pair counts. The federated
C-index adds every site's concordant, discordant and risk-tied pair counts (a comparable
pair never spans two sites), so it is the C-index of all test patients ranked within their
own site, without one risk score at the coordinator. A site that withheld its figures
(fewer than min-count test events) is left out of the pooled count and named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedrad.common.config import RunConfig
from fedrad.common.records import C_INDEX, IBS, N_EVENTS, PAIRS, TD_AUC
from fedrad.common.survival import PairCounts, pooled_c_index
from fedrad.server.strategy import SiteLog


def _value(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def survival_fields(cfg: RunConfig, site: SiteLog, truth: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A site row's survival keys (none for classification): its last evaluation's figures and pair counts."""
    if cfg.task != "survival":
        return {}
    last = site.evaluate[max(site.evaluate)] if site.evaluate else {}
    pairs = [_value(last, key) for key in PAIRS]
    return {
        "c_index": _value(last, C_INDEX), "td_auc": _value(last, TD_AUC), "integrated_brier": _value(last, IBS),
        "n_events_test": None if _value(last, N_EVENTS) is None else int(last[N_EVENTS]),
        "pairs": None if None in pairs else dict(zip(("concordant", "discordant", "tied_risk"), map(int, pairs))),
        "c_index_ceiling": (truth or {}).get("c_index_ceiling_test"),  # simulation: the true risk's own C-index
        "history_c_index": [{"round": r, "c_index": _value(m, C_INDEX)} for r, m in sorted(site.evaluate.items())],
    }


def federated_fields(cfg: RunConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`c_index_federated` from the sites' pair counts, and the sites it covers."""
    if cfg.task != "survival":
        return {}
    counted = [r for r in rows if r.get("pairs")]
    pooled = pooled_c_index(PairCounts(**r["pairs"]) for r in counted) if counted else math.nan
    return {"task": "survival", "c_index_federated": None if not math.isfinite(pooled) else pooled,
            "c_index_federated_sites": [r["name"] for r in counted]}


def survival_markdown(report: Mapping[str, Any]) -> list[str]:
    """The report.md section: one row per site, the federated C-index, where the KM plots are."""
    if report.get("task") != "survival":
        return []

    def fmt(value: Any) -> str:
        return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["", "## Survival (Cox head)", "",
             "| site | test events | C-index | true-risk ceiling | td-AUC (median follow-up) | integrated Brier |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in report["sites"]:
        lines.append(f"| {s['name']} | {fmt(s.get('n_events_test'))} | {fmt(s.get('c_index'))} | "
                     f"{fmt(s.get('c_index_ceiling'))} | {fmt(s.get('td_auc'))} | {fmt(s.get('integrated_brier'))} |")
    lines += ["", f"Federated C-index (pair counts of {', '.join(report['c_index_federated_sites']) or 'no site'}): "
                  f"**{fmt(report['c_index_federated'])}**. Each site's Kaplan-Meier plot of its predicted risk "
                  "groups is in its own work folder (`km-risk-groups.png`); it shows per-patient steps and stays there."]
    return lines
