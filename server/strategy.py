"""FedRad: FedAvg over the shared part only, with per-site bookkeeping.

A subclass of Flower's FedAvg that overrides only `aggregate_train`, `aggregate_evaluate`,
`summary`, and `configure_train` (to remember the global model a round starts from).
Sending is FedAvg's own (the same shared arrays and run config to every site). What it adds:
- every update is validated (keys, shapes, dtype, finiteness) and a bad one is rejected
  and logged with the site's name, never averaged;
- an update whose distance from the global model it started from is more than
  `norm_outlier_factor` times the other updates' median distance is rejected too (a scaled
  or runaway update; the rule assumes most sites are honest);
- the mean is sample-weighted over exactly the shared keys: BatchNorm never reaches the
  coordinator in FedBN mode, so it cannot be touched here;
- per site and per round it records the metrics the site reported and the bytes its
  replies took on the wire (measured from the received messages, not from a formula);
- each site's BN running statistics (record `bn-stats`, with their image count) go, after
  the same validation, into the per-site BN registry (`fedrad.server.bn_registry`), whose pooled
  statistics serve sites never seen in training. They are never averaged into the model.
- every evaluation carries the training prior formed from the sites' class counts
  (`fedrad.server.label_shift`), the reference of each site's label-shift correction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedrad.common.records import (
    ARRAYS,
    BN_SAMPLES,
    BN_STATS,
    LABEL_SHIFT,
    METRICS,
    NUM_EXAMPLES,
    SITE,
    from_numpy,
    payload_bytes,
    prior_record,
    to_numpy,
)
from fedrad.server.aggregate import (
    ArraySpec,
    UpdateRejected,
    norm_outliers,
    update_distance,
    validate_update,
    weighted_average,
)
from fedrad.server.bn_registry import BNRegistry, pool_shared_bn
from fedrad.server.label_shift import training_prior

log = logging.getLogger("fedrad.coordinator")


@dataclass
class SiteLog:
    """What the coordinator learned about one site, round by round (aggregates only)."""

    name: str
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)  # train + evaluate replies of that round


def site_name(msg: Message) -> str:
    """The site's self-declared name, or its node id when the reply carries none."""
    if SITE in msg.content and "name" in msg.content[SITE]:
        return str(msg.content[SITE]["name"])
    return f"node-{msg.metadata.src_node_id}"


class FedRad(FedAvg):
    """Sample-weighted FedAvg of the shared arrays; BN and everything else stays at the sites."""

    def __init__(self, *, expected: dict[str, ArraySpec], min_sites: int = 2, norm_outlier_factor: float = 0.0,
                 on_round: Callable[[int, dict[str, SiteLog]], None] | None = None,
                 bn_expected: dict[str, ArraySpec] | None = None) -> None:
        super().__init__(min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                         weighted_by_key=NUM_EXAMPLES)
        self.expected = expected
        self.min_sites = min_sites
        self.sites: dict[str, SiteLog] = {}
        self.rejected: list[tuple[int, str, str]] = []  # (round, site, reason)
        self.failed: list[tuple[int, str, str]] = []
        self.on_round = on_round
        self.norm_outlier_factor = norm_outlier_factor
        self.reference: dict[str, np.ndarray] | None = None  # the global model this round's updates started from
        self.node_names: dict[int, str] = {}  # node id -> site name, learnt from replies
        self.bn_expected = bn_expected or {}  # BN statistic name -> spec; {} = sites send none
        self.bn_registry = BNRegistry()

    def summary(self) -> None:
        n_values = sum(math.prod(s.shape) for s in self.expected.values())
        log.info("FedRad: averaging %d shared tensors (%d values), min %d sites per round",
                 len(self.expected), n_values, self.min_sites)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.reference = to_numpy(arrays)  # the yardstick of the norm-outlier rule
        return super().configure_train(server_round, arrays, config, grid)
    def training_prior(self) -> np.ndarray | None:
        """Class prior of everything the sites trained on, from their latest class counts."""
        return training_prior(site.train[max(site.train)] for site in self.sites.values() if site.train)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        prior = self.training_prior()
        for msg in messages if prior is not None else []:
            msg.content[LABEL_SHIFT] = prior_record(prior)
        return messages

    def _site(self, name: str) -> SiteLog:
        return self.sites.setdefault(name, SiteLog(name))

    def _ok_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        ok = []
        for msg in replies:
            if msg.has_error():
                reason = msg.error.reason
                node = msg.metadata.src_node_id
                self.failed.append((server_round, self.node_names.get(node, f"node-{node}"), reason))
                log.warning("round %d: node %s failed: %s", server_round, msg.metadata.src_node_id, reason)
            else:
                self.node_names[msg.metadata.src_node_id] = site_name(msg)
                ok.append(msg)
        return ok

    def _reject(self, server_round: int, name: str, reason: str) -> None:
        self.rejected.append((server_round, name, reason))
        log.warning("round %d: rejected update: %s", server_round, reason)

    def _drop_norm_outliers(self, server_round: int, candidates: list[tuple[str, dict[str, np.ndarray], Message]]
                            ) -> list[tuple[str, dict[str, np.ndarray], Message]]:
        if self.reference is None or self.norm_outlier_factor <= 0:
            return candidates
        distances = [update_distance(arrays, self.reference) for _, arrays, _ in candidates]
        kept = []
        for (name, arrays, msg), dist, median in zip(candidates, distances,
                                                     norm_outliers(distances, self.norm_outlier_factor)):
            if median is None:
                kept.append((name, arrays, msg))
            else:
                self._reject(server_round, name, f"site {name}: update is {dist:.3g} from the global model, "
                             f"more than {self.norm_outlier_factor:g} x the other sites' median {median:.3g} "
                             "(norm-outlier-factor).")
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                       MetricRecord | None]:
        accepted: list[tuple[dict[str, np.ndarray], float]] = []
        losses = []
        candidates = []
        bn_of: dict[str, dict[str, np.ndarray]] = {}  # validated BN statistics per site
        for msg in self._ok_replies(server_round, replies):
            name = site_name(msg)
            try:
                if ARRAYS not in msg.content or METRICS not in msg.content:
                    raise UpdateRejected(f"site {name}: reply lacks the '{ARRAYS}' or '{METRICS}' record.")
                arrays = to_numpy(msg.content[ARRAYS])  # type: ignore[arg-type]
                metrics = dict(msg.content[METRICS])  # type: ignore[arg-type]
                validate_update(name, arrays, metrics.get(NUM_EXAMPLES), self.expected)
                bn_of[name] = self._bn_stats(name, msg, metrics)
            except (UpdateRejected, TypeError, ValueError) as err:
                self._reject(server_round, name, str(err))
                continue
            candidates.append((name, arrays, msg))
        # By site name, not arrival order: float sums depend on order, and a run must not depend on which site
        # answered first (otherwise the same seed gives a different model whenever the timing differs).
        candidates.sort(key=lambda c: c[0])
        for name, arrays, msg in self._drop_norm_outliers(server_round, candidates):
            metrics = dict(msg.content[METRICS])  # type: ignore[arg-type]
            site = self._site(name)
            site.train[server_round] = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
            site.bytes_sent[server_round] = payload_bytes(msg.content)
            if bn_of.get(name):
                self.bn_registry.update(name, server_round, bn_of[name], int(metrics[BN_SAMPLES]))  # type: ignore
            accepted.append((arrays, float(metrics[NUM_EXAMPLES])))  # type: ignore[arg-type]
            losses.append((float(metrics.get("train-loss", math.nan)), float(metrics[NUM_EXAMPLES])))  # type: ignore
        if len(accepted) < self.min_sites:
            log.warning("round %d: only %d valid updates (min-sites %d): the global model is kept unchanged.",
                        server_round, len(accepted), self.min_sites)
            return None, None
        n = sum(w for _, w in losses)
        summary = MetricRecord({"train-loss": sum(l * w for l, w in losses) / n, "sites": len(accepted)})
        return from_numpy(pool_shared_bn(accepted, weighted_average(accepted))), summary  # bn-mode=shared: total var

    def _bn_stats(self, name: str, msg: Message, metrics: dict) -> dict[str, np.ndarray]:
        """The reply's validated BN statistics ({} when this run expects none); raises UpdateRejected."""
        if not self.bn_expected:
            if BN_STATS in msg.content:
                raise UpdateRejected(f"site {name}: sent a '{BN_STATS}' record this run does not expect.")
            return {}
        if BN_STATS not in msg.content:
            raise UpdateRejected(f"site {name}: reply lacks the '{BN_STATS}' record (BN running statistics).")
        stats = to_numpy(msg.content[BN_STATS])  # type: ignore[arg-type]
        count = metrics.get(BN_SAMPLES)
        if isinstance(count, bool) or not isinstance(count, (int, float)) or count < 1 or count != int(count):
            raise UpdateRejected(f"site {name}: '{BN_SAMPLES}' must be a positive whole number of images; "
                                 f"got {count!r}.")
        validate_update(name, stats, count, self.bn_expected)
        if any((v < 0).any() for k, v in stats.items() if k.endswith("running_var")):
            raise UpdateRejected(f"site {name}: a BN running_var is negative.")
        return stats

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = []
        for msg in self._ok_replies(server_round, replies):
            name = site_name(msg)
            if METRICS not in msg.content:
                log.warning("round %d: site %s sent no metrics", server_round, name)
                continue
            metrics = {k: float(v) for k, v in msg.content[METRICS].items()}  # type: ignore[arg-type]
            site = self._site(name)
            site.evaluate[server_round] = metrics
            site.bytes_sent[server_round] = site.bytes_sent.get(server_round, 0) + payload_bytes(msg.content)
            rows.append(metrics)
        if self.on_round is not None:
            self.on_round(server_round, self.sites)
        if not rows:
            return None
        weights = np.array([r[NUM_EXAMPLES] for r in rows])
        out = {NUM_EXAMPLES: float(weights.sum())}
        for key in ("auc", "balanced-accuracy", "ece"):
            values = np.array([r.get(key, math.nan) for r in rows])
            ok = np.isfinite(values)
            out[key] = float(np.average(values[ok], weights=weights[ok])) if ok.any() else math.nan
        return MetricRecord(out)
