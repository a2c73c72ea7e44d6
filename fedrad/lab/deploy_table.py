"""The deployment label-shift table over several runs: per seed, mean ± sd per data draw, and issue 16's checks.

One `fedrad simulate` run scores five corrections on each site's deployment evaluation set
(`fedrad.client.deploy_eval`): none, the labelled prior, EM, BBSE and the oracle prior. One
run is one seed on one draw of the data, and ECE on 300 images moves by a few hundredths
between seeds, so a claim about the corrections needs several runs side by side. This reads
the `report.json` of each run (nothing is re-run), groups the runs by their data folder (a
draw), and gives per site:

- per run: each method's prior, ECE, Brier and balanced accuracy, the ratio
  ``ece_deploy_em / ece_deploy_labelled`` and EM's prior error against the truth;
- per draw: mean ± sd over the runs (sample sd, n - 1);
- the checks of issue 16, judged per site and run: EM's prior within `max_prior_error` of
  `prior_deploy_true` where the site has at least `min_unlabelled` unlabelled images, and
  the ratio at most `max_ratio` where the labelled and deployment priors differ by at
  least `min_gap`. A site outside a check's scope is not counted for it.

Only sites that report a deployment evaluation (`n_deploy_eval`) appear.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedrad.lab.compare_report import finite_mean_sd

METHODS = ("none", "labelled", "em", "bbse", "oracle")
LABELS = {"none": "none (π_train)", "labelled": "labelled prior", "em": "EM", "bbse": "BBSE", "oracle": "oracle prior"}
MEASURES = ("prior", "ece", "brier", "balanced_accuracy")


@dataclass(frozen=True)
class Checks:
    """Issue 16's targets (defaults: the issue's numbers)."""

    max_prior_error: float = 0.05  # |prior_em - prior_deploy_true|
    min_unlabelled: int = 300  # ... judged at sites with at least this many unlabelled images
    max_ratio: float = 0.5  # ece_deploy_em / ece_deploy_labelled
    min_gap: float = 0.25  # ... judged where |prior_labelled - prior_deploy_true| is at least this


@dataclass(frozen=True)
class SiteRun:
    """One site's deployment figures in one run."""

    draw: str  # the data folder's name
    seed: int
    run: str  # the run folder
    site: str
    n_unlabelled: int
    n_deploy_eval: int
    prior_labelled: float
    prior_deploy_true: float | None
    values: dict[str, float | None] = field(default_factory=dict)  # "<measure>_deploy_<method>"

    def get(self, measure: str, method: str) -> float | None:
        return self.values.get(f"{measure}_deploy_{method}")

    @property
    def ratio(self) -> float | None:
        """ece_deploy_em / ece_deploy_labelled; None without both."""
        em, lab = self.get("ece", "em"), self.get("ece", "labelled")
        return None if em is None or not lab else em / lab

    @property
    def em_error(self) -> float | None:
        """|prior_em - prior_deploy_true|; None without both."""
        em = self.get("prior", "em")
        return None if em is None or self.prior_deploy_true is None else abs(em - self.prior_deploy_true)

    def prior_check(self, checks: Checks) -> bool | None:
        """EM within the tolerance of the truth; None where the site is out of the check's scope."""
        if self.n_unlabelled < checks.min_unlabelled or self.em_error is None:
            return None
        return self.em_error <= checks.max_prior_error

    def ratio_check(self, checks: Checks) -> bool | None:
        """ECE with EM at most `max_ratio` x ECE with the labelled prior; None out of scope."""
        if self.prior_deploy_true is None or abs(self.prior_labelled - self.prior_deploy_true) < checks.min_gap:
            return None
        return None if self.ratio is None else self.ratio <= checks.max_ratio


def load_site_runs(run_dirs: Iterable[Path]) -> list[SiteRun]:
    """Every site with a deployment evaluation in these runs' report.json files (a run dir or the file itself)."""
    rows: list[SiteRun] = []
    for run in run_dirs:
        path = Path(run) / "report.json" if Path(run).is_dir() else Path(run)
        if not path.is_file():
            raise FileNotFoundError(f"no report.json at {path}")
        report = json.loads(path.read_text())
        config = report.get("config", {})
        draw = Path(str(config.get("data-dir") or "?")).name
        seed = int(config.get("seed", 0))
        for s in report.get("sites", []):
            if not s.get("n_deploy_eval") or s.get("prior_labelled") is None:
                continue
            values = {f"{m}_deploy_{k}": s.get(f"{m}_deploy_{k}") for m in MEASURES for k in METHODS}
            rows.append(SiteRun(draw=draw, seed=seed, run=str(path.parent), site=s["name"],
                                n_unlabelled=int(s.get("n_unlabelled") or 0), n_deploy_eval=int(s["n_deploy_eval"]),
                                prior_labelled=float(s["prior_labelled"]), prior_deploy_true=s.get("prior_deploy_true"),
                                values=values))
    return sorted(rows, key=lambda r: (r.draw, r.site, r.seed))


def mean_sd(values: Sequence[float | None]) -> tuple[float, float, int] | None:
    """Mean, sample sd (0 for one value; `finite_mean_sd`, as compare and the studies) and count of the finite
    values; None when there are none."""
    mean, sd = finite_mean_sd(values)
    if mean is None:
        return None
    return mean, sd, sum(v is not None and math.isfinite(v) for v in values)


def _f(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _ms(values: Sequence[float | None], nd: int = 3) -> str:
    m = mean_sd(values)
    return "–" if m is None else f"{m[0]:.{nd}f} ± {m[1]:.{nd}f}"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _groups(rows: list[SiteRun]) -> dict[tuple[str, str], list[SiteRun]]:
    out: dict[tuple[str, str], list[SiteRun]] = {}
    for r in rows:
        out.setdefault((r.draw, r.site), []).append(r)
    return out


def per_run_markdown(rows: list[SiteRun], checks: Checks = Checks()) -> str:
    """One line per draw, site and seed: each method's prior and ECE, the ratio, EM's error and both checks."""
    head = ("| draw | site | seed | prior labelled / true | " + " | ".join(f"{LABELS[m]}: prior, ECE" for m in METHODS)
            + " | ECE EM / labelled | EM error | EM prior ok | ratio ok |")
    lines = [head, "|" + "---|" * 3 + "---:|" * (len(METHODS) + 5)]
    for r in rows:
        cells = [f"{_f(r.get('prior', m))}, {_f(r.get('ece', m))}" for m in METHODS]
        lines.append(f"| {r.draw} | {r.site} | {r.seed} | {_f(r.prior_labelled)} / {_f(r.prior_deploy_true)} | "
                     + " | ".join(cells) + f" | {_f(r.ratio, 2)} | {_f(r.em_error)} | {_mark(r.prior_check(checks))} "
                     f"| {_mark(r.ratio_check(checks))} |")
    return "\n".join(lines)


def summary_markdown(rows: list[SiteRun]) -> str:
    """Per draw and site, five rows (one per method): mean ± sd over the runs of prior, ECE, Brier, bal. accuracy."""
    lines = ["| draw | site | correction | runs | prior used | ECE | Brier | bal. acc. |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (draw, site), group in _groups(rows).items():
        true = mean_sd([r.prior_deploy_true for r in group])
        for i, m in enumerate(METHODS):
            name = f"{site} (true {_f(true[0] if true else None)})" if i == 0 else site
            n = sum(r.get("ece", m) is not None for r in group)
            lines.append(f"| {draw} | {name} | {LABELS[m]} | {n} | {_ms([r.get('prior', m) for r in group])} | "
                         f"{_ms([r.get('ece', m) for r in group])} | {_ms([r.get('brier', m) for r in group])} | "
                         f"{_ms([r.get('balanced_accuracy', m) for r in group])} |")
    return "\n".join(lines)


def checks_summary(rows: list[SiteRun], checks: Checks = Checks()) -> dict:
    """How many site-runs meet each check, and which fail (draw, site, seed, value)."""
    out: dict = {}
    for name, judge, value in (("em_prior", SiteRun.prior_check, lambda r: r.em_error),
                               ("ece_ratio", SiteRun.ratio_check, lambda r: r.ratio)):
        judged = [(r, judge(r, checks)) for r in rows]
        judged = [(r, ok) for r, ok in judged if ok is not None]
        out[name] = {"judged": len(judged), "met": sum(ok for _, ok in judged),
                     "failed": [{"draw": r.draw, "site": r.site, "seed": r.seed, "value": value(r)}
                                for r, ok in judged if not ok]}
    return out


def checks_markdown(rows: list[SiteRun], checks: Checks = Checks()) -> str:
    """The checks stated plainly, with the per-draw mean ± sd of the ratio and of EM's error."""
    summary = checks_summary(rows, checks)
    lines = []
    for (draw, site), group in _groups(rows).items():
        lines.append(f"- {draw} {site}: ECE EM / labelled {_ms([r.ratio for r in group], 2)} "
                     f"(per seed {', '.join(_f(r.ratio, 2) for r in group)}); EM prior error "
                     f"{_ms([r.em_error for r in group])} (n unlabelled {group[0].n_unlabelled}, "
                     f"n evaluation {group[0].n_deploy_eval})")
    p, q = summary["em_prior"], summary["ece_ratio"]
    lines.append(f"- EM's prior within {checks.max_prior_error} of the truth (sites with ≥ {checks.min_unlabelled} "
                 f"unlabelled images): {p['met']} of {p['judged']} site-runs"
                 + "".join(f"; fails {f['draw']} {f['site']} seed {f['seed']} ({_f(f['value'])})" for f in p["failed"]))
    lines.append(f"- ECE with EM ≤ {checks.max_ratio} × ECE with the labelled prior (priors ≥ {checks.min_gap} apart): "
                 f"{q['met']} of {q['judged']} site-runs"
                 + "".join(f"; fails {f['draw']} {f['site']} seed {f['seed']} ({_f(f['value'], 2)})"
                           for f in q["failed"]))
    return "\n".join(lines)


def deploy_table(run_dirs: Iterable[Path], checks: Checks = Checks()) -> tuple[str, dict]:
    """The markdown (summary, checks, per run) and a JSON-able dict of the same figures."""
    rows = load_site_runs(run_dirs)
    if not rows:
        raise ValueError("none of these runs has a site with a deployment evaluation set (deploy-audit.csv)")
    md = "\n\n".join(["Mean ± sd over the runs of each draw:", summary_markdown(rows), "Checks (issue 16):",
                      checks_markdown(rows, checks), "Per run:", per_run_markdown(rows, checks)])
    data = {"checks": checks_summary(rows, checks),
            "site_runs": [{"draw": r.draw, "seed": r.seed, "run": r.run, "site": r.site, "n_unlabelled": r.n_unlabelled,
                           "n_deploy_eval": r.n_deploy_eval, "prior_labelled": r.prior_labelled,
                           "prior_deploy_true": r.prior_deploy_true, "ratio_em_labelled": r.ratio,
                           "em_prior_error": r.em_error, **r.values} for r in rows]}
    return md, data
