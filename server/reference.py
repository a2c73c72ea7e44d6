"""The coordinator's side of the federated intensity reference and the round-0 shift score.

Before round 1 (only when harmonisation, the shift score or an automatic spacing is on):

1. `reference` query: every site sends its spacing summary and its HU histogram (fixed
   bins, counts only). With `spacing-mm = 0` the coordinator first asks for spacings only,
   picks the reference spacing (`choose_spacing`) and then asks for the histograms at it.
2. The usable histograms are added into the reference histogram (`pool_histograms`); a
   site with too few pixels or a constant image is left out with a warning naming it.
3. `shift` query: the reference histogram and a fixed projection go out; every site
   sends the moments of its pretrained features on raw and harmonised inputs, from which
   the coordinator computes each site's shift score before and after harmonisation.

What then travels with every train/evaluate message is `Exchange.broadcast()`. The
arithmetic lives in `common/harmonize.py` and `common/feature_shift.py`; this module sends and
receives.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import NUM_FEATURES
from fedrad.common.feature_shift import Moments, projection, shift_scores
from fedrad.common.harmonize import bin_edges, histogram_problem, pool_histograms, summary
from fedrad.common.packing import PackingError
from fedrad.common.records import (
    CONFIG,
    HARMONIZED,
    HISTOGRAM,
    INTENSITY,
    METRICS,
    MOMENTS,
    PROJECTION,
    QUERY_KIND,
    RAW,
    REFERENCE,
    REFERENCE_HISTOGRAM,
    config_record,
    from_numpy,
    moment_keys,
)
from fedrad.server.identity import IdentityRefused, bind
from fedrad.server.rounds import registered_names, send_and_receive, unpacked
from fedrad.server.strategy import failure

log = logging.getLogger("fedrad.coordinator")


@dataclass
class SiteReference:
    """What one site told the coordinator before round 1 (aggregates only)."""

    spacing_mm: dict[str, float] = field(default_factory=dict)  # median / p05 / p95
    n_images: int = 0
    histogram: np.ndarray | None = None
    excluded: str | None = None  # why its histogram is not in the reference
    moments: dict[str, Moments] = field(default_factory=dict)  # "raw" / "harmonized" -> pretrained moments


@dataclass
class Exchange:
    """The outcome of the reference exchange: the run's resolved config and what goes out."""

    cfg: RunConfig
    spacing_source: str  # "configured" or "median of the sites"
    reference: np.ndarray | None = None  # pooled counts (N_BINS,); None with harmonize off
    projection: np.ndarray | None = None  # (shift-dim, 1280); None with shift-dim 0
    sites: dict[str, SiteReference] = field(default_factory=dict)
    asked: dict[int, str] = field(default_factory=dict)  # node id -> name of the sites queried (round 1 waits for them)
    names: dict[int, str] = field(default_factory=dict)  # node id -> the site name bound to it (`identity.bind`)

    def broadcast(self) -> ArrayRecord | None:
        """The REFERENCE record sent with every train/evaluate message (None when empty)."""
        arrays = {}
        if self.reference is not None:
            arrays[REFERENCE_HISTOGRAM] = self.reference
        if self.projection is not None:
            arrays[PROJECTION] = self.projection
        return from_numpy(arrays) if arrays else None

    def round0_scores(self) -> dict[str, dict[str, float]]:
        """{"raw"|"harmonized": {site: shift score}} of the pretrained features."""
        out = {}
        for variant in ("raw", "harmonized"):
            found = {name: s.moments[variant] for name, s in self.sites.items() if variant in s.moments}
            if found:
                out[variant] = shift_scores(found)
        return out

    def save(self, out_dir: Path) -> Path:
        """The reference with the run's outputs: `reference.npz` (counts, bin edges, spacing, projection)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "reference.npz"
        arrays: dict[str, Any] = {"bin_edges_hu": bin_edges(), "spacing_mm": np.float64(self.cfg.spacing_mm),
                                  "method": np.str_(self.cfg.harmonize)}
        if self.reference is not None:
            arrays["reference_counts"] = self.reference
        if self.projection is not None:
            arrays["projection"] = self.projection
        np.savez(path, **arrays)
        return path


def needed(cfg: RunConfig) -> bool:
    """Whether the run starts with the reference exchange at all."""
    return cfg.harmonize != "off" or cfg.shift_dim > 0 or cfg.spacing_mm == 0


def choose_spacing(summaries: dict[str, tuple[float, int]]) -> float:
    """The reference spacing: the image-weighted median of the sites' median spacings (mm).

    The median keeps the sites' typical resolution: finer sites are downsampled (with
    anti-aliasing), coarser ones upsampled, and no site dictates it alone.
    """
    items = sorted((s, n) for s, n in summaries.values() if np.isfinite(s) and n > 0)
    if not items:
        raise ValueError("No site reported a usable pixel spacing; set spacing-mm explicitly.")
    weights = np.cumsum([n for _, n in items])
    return float(items[int(np.searchsorted(weights, weights[-1] / 2.0))][0])


def query_sites(grid: Grid, cfg: RunConfig, kind: str, reference: ArrayRecord | None = None, *,
                asked: dict[int, str] | None = None) -> list[Message]:
    """One query message per connected site (added to `asked`: id -> name); the replies without errors."""
    waited = 0
    while len(nodes := list(grid.get_node_ids())) < cfg.min_sites:
        if waited % 30 == 0:
            log.info("waiting for sites: %d connected, %d needed (min-sites)", len(nodes), cfg.min_sites)
        time.sleep(1.0)
        waited += 1
    content = RecordDict({CONFIG: config_record(cfg.to_run_config(), {QUERY_KIND: kind})})
    if reference is not None:
        content[REFERENCE] = reference
    messages = [Message(content=content, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    if asked is not None:
        names = registered_names(grid)
        asked.update({node: names.get(node, "") for node in nodes})
    ok, failed = [], []
    for reply in send_and_receive(grid, messages, cfg.round_timeout):  # short polls (fedrad.server.rounds)
        if reply.has_error():
            failed.append(f"node {reply.metadata.src_node_id}: {failure(reply)}")
            log.warning("%s query: %s", kind, failed[-1])
            continue
        try:
            ok.append(unpacked(reply))
        except PackingError as err:
            failed.append(f"node {reply.metadata.src_node_id}: malformed reply: {err}")
            log.warning("%s query: %s", kind, failed[-1])
    if len(ok) < cfg.min_sites:
        raise RuntimeError(f"The '{kind}' query before round 1 got {len(ok)} answers from {len(nodes)} sites "
                           f"(min-sites {cfg.min_sites}); failures: {failed or 'none (timed out)'}. Fix the failing "
                           "sites, or run with harmonize = 'off', shift-dim = 0 and a spacing-mm > 0.")
    return ok


def named(result: Exchange, replies: list[Message]) -> list[tuple[str, Message]]:
    """(site, reply) for each reply whose declared name matches its node (`fedrad.server.identity`)."""
    out = []
    for reply in replies:
        try:
            out.append((bind(result.names, reply), reply))
        except IdentityRefused as err:
            log.warning("query reply refused: %s", err)
    return out


def exchange_reference(grid: Grid, cfg: RunConfig) -> Exchange:
    """Run the exchange described in the module docstring; return the resolved run."""
    result = Exchange(cfg, "configured")
    result.names.update({node: name for node, name in registered_names(grid).items() if name})
    if cfg.spacing_mm == 0:
        summaries = {}
        for name, reply in named(result, query_sites(grid, cfg, "reference", asked=result.asked)):
            metrics = reply.content[METRICS]
            if "spacing-median-mm" in metrics:  # else withheld (the site's min-count)
                summaries[name] = (float(metrics["spacing-median-mm"]), int(metrics.get("n-images", 0) or 1))
        result.cfg = cfg = cfg.replace(spacing_mm=choose_spacing(summaries))
        result.spacing_source = "median of the sites"
        log.info("reference spacing %.3g mm: the median of the sites' spacings", cfg.spacing_mm)
    for name, reply in named(result, query_sites(grid, cfg, "reference", asked=result.asked)):
        metrics = reply.content[METRICS]
        site = result.sites.setdefault(name, SiteReference())
        site.spacing_mm = {k: float(metrics[f"spacing-{k}-mm"]) for k in ("median", "p05", "p95")
                           if f"spacing-{k}-mm" in metrics}  # withheld below the site's min-count
        site.n_images = int(metrics.get("n-images", 0))
        if INTENSITY in reply.content:
            site.histogram = reply.content[INTENSITY][HISTOGRAM].numpy().astype(np.int64)
    _pool(result)
    if cfg.shift_dim > 0:
        result.projection = projection(NUM_FEATURES, cfg.shift_dim, seed=cfg.seed)
        for name, reply in named(result, query_sites(grid, cfg, "shift", result.broadcast(), asked=result.asked)):
            site = result.sites.setdefault(name, SiteReference())
            if MOMENTS in reply.content:
                arrays = {k: v.numpy() for k, v in reply.content[MOMENTS].items()}
                n = int(reply.content[METRICS]["n-features"])
                for variant, prefix in (("raw", RAW), ("harmonized", HARMONIZED)):
                    mean, cov = moment_keys(prefix)
                    if mean in arrays:
                        site.moments[variant] = Moments(n, arrays[mean].astype(np.float64),
                                                        arrays[cov].astype(np.float64))
        for variant, scores in result.round0_scores().items():
            log.info("shift score, pretrained features, %s inputs: %s", variant,
                     " · ".join(f"{name} {score:.3g}" for name, score in sorted(scores.items())))
    return result


def _pool(result: Exchange) -> None:
    """Pool the usable histograms into the reference (harmonize on), leaving out bad ones by name."""
    usable = []
    for name, site in sorted(result.sites.items()):
        if site.histogram is None:
            continue
        site.excluded = histogram_problem(site.histogram)
        if site.excluded is not None:
            log.warning("site %s: %s; its histogram is left out of the reference.", name, site.excluded)
        else:
            usable.append(site.histogram)
    if result.cfg.harmonize == "off":
        return
    if not usable:
        log.warning("no site sent a usable intensity histogram: harmonisation is switched off for this run.")
        result.cfg = result.cfg.replace(harmonize="off")
        return
    result.reference = pool_histograms(usable)
    log.info("intensity reference (%s): %d sites, %d pixels; spacing %.3g mm (%s)", result.cfg.harmonize,
             len(usable), int(result.reference.sum()), result.cfg.spacing_mm, result.spacing_source)


def site_table(result: Exchange) -> list[dict[str, Any]]:
    """Per site: spacing summary, intensity summary of its histogram, round-0 shift scores."""
    scores = result.round0_scores()
    rows = []
    for name, site in sorted(result.sites.items()):
        intensity = summary(site.histogram) if site.histogram is not None else {}
        rows.append({"name": name, "spacing_mm": site.spacing_mm, "n_images": site.n_images,
                     "intensity": intensity, "excluded": site.excluded,
                     "shift_raw": scores.get("raw", {}).get(name),
                     "shift_harmonized": scores.get("harmonized", {}).get(name)})
    return rows
