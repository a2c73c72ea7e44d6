"""What `fedrad compare` runs: the strategies, and one job per (strategy, seed) and per (held-out site, seed).

Planning is separate from running (`fedrad.lab.compare`) and from reporting
(`fedrad.lab.compare_report`): both read the plan, neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrad.common.config import RunConfig
from fedrad.common.sites import discover_sites


@dataclass(frozen=True)
class StrategySpec:
    """A strategy of the comparison: how it trains and which config changes make it."""

    name: str
    kind: str  # "local" | "pooled" | "federated"
    changes: dict[str, Any]
    what: str
    cost: float  # relative compute, for scheduling the longest jobs first


STRATEGIES: tuple[StrategySpec, ...] = (
    StrategySpec("local", "local", {}, "each site alone, partial fine-tuning, nothing sent", 1.0),
    StrategySpec("pooled", "pooled", {}, "all sites' images in one place (upper bound, simulation only)", 1.0),
    StrategySpec("fedavg-full", "federated", {"freeze_blocks": -1, "bn_mode": "shared", "lr_decay": 1.0},
                 "whole network and BN averaged (plain FedAvg), every layer at one rate", 2.5),
    StrategySpec("fedbn", "federated", {"bn_mode": "fedbn"}, "partial fine-tuning, BN stays at each site", 1.0),
    StrategySpec("silobn", "federated", {"bn_mode": "silobn"},
                 "partial fine-tuning, BN statistics local, BN affine averaged", 1.0),
    StrategySpec("linear-probe", "federated", {"freeze_blocks": 17}, "frozen backbone, only the head shared", 0.3),
    StrategySpec("full", "federated", {"freeze_blocks": -1, "bn_mode": "fedbn", "lr_decay": 1.0},
                 "full fine-tuning, BN per site, every layer at one rate", 2.5),
    StrategySpec("full-discriminative", "federated", {"freeze_blocks": -1, "bn_mode": "fedbn", "lr_decay": 0.5},
                 "full fine-tuning, BN per site, discriminative rates (lr-decay 0.5: the stem at ~4e-6 x lr-max)",
                 2.5),
)
BY_NAME = {s.name: s for s in STRATEGIES}
LOSO_COST = 0.75


@dataclass(frozen=True)
class Job:
    """One unit of work: a strategy at a seed, or a held-out site at a seed."""

    kind: str  # "local" | "pooled" | "federated" | "loso"
    name: str  # strategy name, or the held-out site
    seed: int
    config: dict[str, Any]  # kebab-case run config
    out_dir: str
    cost: float = 1.0
    tuning: bool = False  # a run on the validation copy (`fedrad.lab.lr_tuning`), at one rate of the grid


@dataclass
class ComparePlan:
    """What `compare` will run."""

    base: RunConfig
    strategies: list[str]
    seeds: list[int]
    sites: list[str]
    loso: bool
    loso_bn_mode: str
    out: Path
    jobs: list[Job] = field(default_factory=list)
    lr_grid: tuple[float, ...] = ()  # empty: every strategy runs at the config's lr-max (no tuning)
    tuning: list[Job] = field(default_factory=list)  # run first; their validation AUCs choose each lr-max
    tuned: dict[str, Any] = field(default_factory=dict)  # filled by the run: grid, validation AUCs, chosen rate
    preset: dict[str, float] = field(default_factory=dict)  # --lr-from: rates chosen by an earlier compare's tuning

    @property
    def tuning_data(self) -> Path:
        """Where the validation copy of the data goes."""
        return self.out / "tuning-data"


def plan_compare(base: RunConfig, *, out: Path, seeds: int = 3, strategies: Sequence[str] | None = None,
                 loso: bool = True, loso_bn_mode: str = "silobn",
                 lr_grid: Sequence[float] = ()) -> ComparePlan:
    """The job list, longest first; refuses unknown strategies by name.

    With `lr_grid`, one tuning run per strategy and rate (at the first seed, on the
    validation copy, label-shift analysis off) comes first; the real runs' lr-max is set
    from them when they are done (`fedrad.lab.compare`).
    """
    names = list(strategies) if strategies else [s.name for s in STRATEGIES]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"Unknown strategy {unknown}; known: {[s.name for s in STRATEGIES]}.")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1; got {seeds}.")
    sites = [p.name for p in discover_sites(Path(base.data_dir))]
    plan = ComparePlan(base, names, [base.seed + i for i in range(seeds)], sites, loso and len(sites) >= 3,
                       loso_bn_mode, out)
    for seed in plan.seeds:
        for name in names:
            spec = BY_NAME[name]
            cfg = base.replace(seed=seed, **spec.changes)
            folder = out / "runs" / name / f"seed-{seed}"
            plan.jobs.append(Job(spec.kind, name, seed, cfg.replace(out_dir=str(folder)).to_run_config(),
                                 str(folder), spec.cost))
        if plan.loso:
            for site in sites:
                folder = out / "loso" / site / f"seed-{seed}"
                cfg = base.replace(seed=seed, bn_mode=loso_bn_mode, out_dir=str(folder))
                plan.jobs.append(Job("loso", site, seed, cfg.to_run_config(), str(folder), LOSO_COST))
    plan.jobs.sort(key=lambda j: -j.cost)  # longest first: the progress bar's estimate settles early
    plan.lr_grid = tuple(lr_grid)
    for name in names if plan.lr_grid else ():
        spec = BY_NAME[name]
        for lr in plan.lr_grid:
            folder = out / "tuning" / name / f"lr-{lr:g}"
            cfg = base.replace(seed=plan.seeds[0], lr_max=lr, label_shift=False, data_dir=str(plan.tuning_data),
                               out_dir=str(folder), **spec.changes)
            plan.tuning.append(Job(spec.kind, name, plan.seeds[0], cfg.to_run_config(), str(folder), spec.cost,
                                   tuning=True))
    return plan
