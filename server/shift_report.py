"""The shift table of a run: per site spacing, intensity summary and shift scores.

Built from aggregates only: each site's spacing summary and HU histogram, the pooled
reference, and the shift scores the coordinator computed from the sites' feature moments
(before round 1 on the pretrained model, raw and harmonised inputs; then every round on
the site's current model).
"""

from __future__ import annotations

import math
from typing import Any

from fedrad.common.harmonize import summary
from fedrad.server.reference import Exchange, site_table


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def harmonization_section(exchange: Exchange, per_round: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The report's `harmonization` entry (JSON-ready)."""
    rows = site_table(exchange)
    for row in rows:
        row["intensity"] = {k: _num(v) for k, v in row["intensity"].items()}
        row["shift_raw"], row["shift_harmonized"] = _num(row["shift_raw"]), _num(row["shift_harmonized"])
        row["shift_rounds"] = {str(r): _num(scores.get(row["name"])) for r, scores in sorted(per_round.items())}
    return {
        "method": exchange.cfg.harmonize,
        "spacing_mm": exchange.cfg.spacing_mm,
        "spacing_source": exchange.spacing_source,
        "shift_dim": exchange.cfg.shift_dim,
        "reference": ({k: _num(v) for k, v in summary(exchange.reference).items()}
                      if exchange.reference is not None else None),
        "sites": rows,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def harmonization_markdown(section: dict[str, Any]) -> list[str]:
    """Markdown lines: the shift table and how to read it."""
    method = section["method"]
    ref = section["reference"]
    lines = [
        "## Intensity harmonisation and shift",
        "",
        f"Harmonisation **{method}**; every image resampled to {section['spacing_mm']:.3g} mm "
        f"({section['spacing_source']}).",
    ]
    if ref is not None:
        lines.append(f"Reference histogram: {ref['pixels']:,} pixels, p5/p50/p95 = {_fmt(ref['p5_hu'])} / "
                     f"{_fmt(ref['p50_hu'])} / {_fmt(ref['p95_hu'])} HU.")
    rounds = sorted({int(r) for s in section["sites"] for r in s["shift_rounds"]})
    last = str(rounds[-1]) if rounds else None
    lines += [
        "",
        "Shift score = Fréchet distance of the site's feature moments to the pooled moments "
        f"({section['shift_dim']} projected dimensions); 0 = like the federation. *Pretrained*: the same "
        "pretrained network at every site, on raw and on harmonised inputs (the effect of harmonisation "
        "alone). *Round*: the site's own model during the run.",
        "",
        "| site | spacing mm (p5–p95) | HU p5 / p50 / p95 | shift pretrained raw | shift pretrained harmonised"
        f" | shift round {last or '–'} |",
        "|---|---|---|---:|---:|---:|",
    ]
    for s in section["sites"]:
        sp, it = s["spacing_mm"], s["intensity"]
        spacing = f"{sp['median']:.2f} ({sp['p05']:.2f}–{sp['p95']:.2f})" if sp else "–"
        hu = f"{_fmt(it.get('p5_hu'), 4)} / {_fmt(it.get('p50_hu'), 4)} / {_fmt(it.get('p95_hu'), 4)}" if it else "–"
        if s["excluded"]:
            hu += f" (left out: {s['excluded']})"
        final = s["shift_rounds"].get(last) if last else None
        lines.append(f"| {s['name']} | {spacing} | {hu} | {_fmt(s['shift_raw'])} | {_fmt(s['shift_harmonized'])} | "
                     f"{_fmt(final)} |")
    return lines
