"""report.html: the run report as one self-contained page, viewable offline in a hospital.

Rendered from report.md (the same tables: per-site results, the label-shift table, the shift
table) by markdown-it-py, with every plot embedded as a base64 PNG `data:` URI: no script, no
stylesheet or font from anywhere, no CDN, nothing fetched when it opens. Beside the AUC per
round it shows calibration before and after the sites' correction: each site's reliability
diagram on its test split, drawn from the per-bin aggregates the site sends in the last round
(images, mean predicted P(malignant), fraction malignant; bins of fewer than the site's
min-count images are not sent, and show as gaps), and the ECE pair per site with its floor.
No posterior leaves a site; `fedrad evaluate` draws the full diagram there.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; }
th { background: #f3f3f3; }
td { text-align: right; } td:first-child { text-align: left; }
img { max-width: 100%; }
"""
_IMG = re.compile(r'src="([^"]+)"')


def plot_calibration(report: dict[str, Any], path: Path) -> Path | None:
    """ECE before → after correction per site (with its floor); None when no site reported both."""
    sites = [s for s in report["sites"] if s.get("ece_uncorrected") is not None and s.get("ece_corrected") is not None]
    if not sites:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(sites))
    ax.bar([i - 0.2 for i in x], [s["ece_uncorrected"] for s in sites], width=0.4, label="before (global model)")
    ax.bar([i + 0.2 for i in x], [s["ece_corrected"] for s in sites], width=0.4, label="after (calibrated, prior)")
    floors = [s.get("ece_floor") for s in sites]
    ax.scatter(list(x), [math.nan if f is None else f for f in floors], color="black", marker="_", s=400,
               label="floor (perfect calibration)", zorder=3)
    ax.set_xticks(list(x), [s["name"] for s in sites])
    ax.set_ylabel("ECE (test split)")
    ax.set_title("Calibration before and after each site's correction", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(report: dict[str, Any], path: Path) -> Path | None:
    """One reliability diagram per site, before and after its correction; None when no site sent bins."""
    sites = [s for s in report["sites"] if s.get("reliability")]
    if not sites:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sites), figsize=(2.6 * len(sites) + 0.4, 2.9), squeeze=False)
    for ax, site in zip(axes[0], sites):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for name, style in (("uncorrected", "o-"), ("corrected", "s-")):
            bins = site["reliability"].get(name) or []
            pts = [(b[1], b[2]) for b in bins if b is not None]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, lw=1, label="before" if name == "uncorrected" else "after")
        ax.set_title(site["name"], fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted P(malignant)", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("fraction malignant", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Reliability on each site's test split, before and after its correction", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(markdown: str, out_dir: Path, *, title: str = "fedrad run report") -> str:
    """HTML of `markdown` with each local image it names (relative to `out_dir`) embedded; a missing one is refused."""
    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def embed(match: re.Match[str]) -> str:
        src = html.unescape(match.group(1))
        if src.startswith("data:"):
            return match.group(0)
        path = Path(out_dir) / src
        if re.match(r"^[a-z]+:", src) or not path.is_file():
            raise ValueError(f"report.html would link {src!r}, which is not a file in {out_dir}; every image is "
                             "embedded so the page opens offline.")
        return f'src="{_data_uri(path)}"'

    body = _IMG.sub(embed, body)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n")


def write_html(report: dict[str, Any], markdown: str, out_dir: Path) -> Path:
    """report.html (and calibration.png) in `out_dir`, from the report and its report.md text."""
    out_dir = Path(out_dir)
    figure = plot_calibration(report, out_dir / "calibration.png")
    diagrams = plot_reliability(report, out_dir / "reliability.png")
    if figure is not None or diagrams is not None:
        markdown += "\n## Calibration before and after correction\n\n"
    if diagrams is not None:
        markdown += ("![Reliability diagrams before and after correction](reliability.png)\n\nPer bin of "
                     "P(malignant) the sites sent the image count, the mean prediction and the fraction "
                     "malignant; bins below a site's min-count are not sent (gaps).\n\n")
    if figure is not None:
        markdown += "![ECE before and after correction](calibration.png)\n"
    path = out_dir / "report.html"
    path.write_text(render_html(markdown, out_dir, title=f"fedrad run report · {report.get('strategy', '')}"),
                    encoding="utf-8")
    return path
