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
  (`fedrad.server.label_shift`), the reference of each site's label-shift correction;
- with `bn-shrink` > 0 every training message carries the registry's pooled BN statistics
  (record `bn-pooled`), toward which a site with few images shrinks its own
  (`fedrad.client.bn_shrink`); none in round 1, when the registry is still empty;
- a site's influence is bounded: its example count may not grow past what it first
  reported, its weight is at most `weight_cap` x the other sites' median weight, and the
  outlier rule also judges each update's weighted contribution (weight x distance);
- a reply counts for the site its node is bound to (`fedrad.server.identity`), and a failed
  reply is recorded by its code only (`fedrad.common.codes`): no site's error text is kept.
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

from fedrad.common.codes import NAMES as CODE_NAMES
from fedrad.common.codes import parse as parse_reason
from fedrad.common.records import (
    ARRAYS,
    BN_POOLED,
    BN_SAMPLES,
    BN_STATS,
    LABEL_SHIFT,
    METRICS,
    NUM_EXAMPLES,
    WITHHELD,
    from_numpy,
    numpy_views,
    payload_bytes,
    prior_record,
    to_numpy,
)
from fedrad.server.aggregate import (
    ArraySpec,
    UpdateRejected,
    capped_weights,
    norm_outliers,
    update_distance,
    validate_update,
    weighted_average,
)
from fedrad.server.bn_registry import BNRegistry, pool_shared_bn
from fedrad.server.identity import IdentityRefused, bind, declared_name
from fedrad.server.label_shift import training_prior

log = logging.getLogger("fedrad.coordinator")
MIN_POOLED_SITES = 3  # bn-shrink: the pooled BN statistics are sent only when pooled over this many sites


@dataclass
class SiteLog:
    """What the coordinator learned about one site, round by round (aggregates only)."""

    name: str
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)  # train + evaluate replies of that round
    withheld: dict[int, dict[str, str]] = field(default_factory=dict)  # round -> {aggregate: reason code}


site_name = declared_name  # the name a reply declares (checked against its node by `FedRad.identify`)


def failure(msg: Message) -> str:
    """What the coordinator keeps of a failed reply: a known code and incident id, never free text."""
    code = msg.error.code
    if code in CODE_NAMES:
        name, incident = parse_reason(code, msg.error.reason)
        return f"{name} (incident {incident})" if incident else "internal"
    return f"flower error {code}"  # Flower's own codes (lost node, crashed ClientApp); its text is not kept


class FedRad(FedAvg):
    """Sample-weighted FedAvg of the shared arrays; BN and everything else stays at the sites."""

    def __init__(self, *, expected: dict[str, ArraySpec], min_sites: int = 2, norm_outlier_factor: float = 0.0,
                 on_round: Callable[[int, dict[str, SiteLog]], None] | None = None,
                 bn_expected: dict[str, ArraySpec] | None = None, weight_cap: float = 0.0,
                 bn_shrink: float = 0.0) -> None:
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
        self.weight_cap = weight_cap
        self.count_cap: dict[str, float] = {}  # site -> the most examples it may claim (its first report)
        self.bn_shrink = bn_shrink  # > 0: send the pooled BN statistics with every training message

    def summary(self) -> None:
        n_values = sum(math.prod(s.shape) for s in self.expected.values())
        log.info("FedRad: averaging %d shared tensors (%d values), min %d sites per round",
                 len(self.expected), n_values, self.min_sites)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.reference = to_numpy(arrays)  # the yardstick of the norm-outlier rule
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # With two sites a site could subtract its own statistics from the pool and read the other's: the pool
        # goes out only once it holds at least MIN_POOLED_SITES sites.
        enough = len(self.bn_registry.sites) >= MIN_POOLED_SITES
        pooled = self.bn_registry.pooled() if self.bn_shrink > 0 and enough else {}
        for msg in messages if pooled else []:  # the same aggregate for every site
            msg.content[BN_POOLED] = from_numpy(pooled)
        return messages

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

    def evaluated(self, server_round: int) -> bool:
        """Whether any site's evaluation of this round's global model has come in."""
        return any(server_round in site.evaluate for site in self.sites.values())

    def _site(self, name: str) -> SiteLog:
        return self.sites.setdefault(name, SiteLog(name))

    def identify(self, msg: Message) -> str:
        """The site this reply counts for: the name bound to its node (raises IdentityRefused)."""
        return bind(self.node_names, msg)

    def _ok_replies(self, server_round: int, replies: Iterable[Message]) -> list[tuple[str, Message]]:
        """(site, reply) of every reply without an error from a node whose name checks out."""
        ok = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = failure(msg)
                self.failed.append((server_round, self.node_names.get(node, f"node-{node}"), reason))
                log.warning("round %d: node %s failed: %s", server_round, node, reason)
                continue
            try:
                name = self.identify(msg)
            except IdentityRefused as err:
                self.reject(server_round, f"node-{node}", str(err))
                continue
            if WITHHELD in msg.content:
                withheld = {k: str(v) for k, v in msg.content[WITHHELD].items()}  # type: ignore[union-attr]
                self._site(name).withheld.setdefault(server_round, {}).update(withheld)
            ok.append((name, msg))
        return ok

    def reject(self, server_round: int, name: str, reason: str) -> None:
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
                self.reject(server_round, name, f"site {name}: update is {dist:.3g} from the global model, "
                             f"more than {self.norm_outlier_factor:g} x the other sites' median {median:.3g} "
                             "(norm-outlier-factor).")
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                       MetricRecord | None]:
        accepted: list[tuple[dict[str, np.ndarray], float]] = []
        losses = []
        candidates = []
        bn_of: dict[str, dict[str, np.ndarray]] = {}  # validated BN statistics per site
        for name, msg in self._ok_replies(server_round, replies):
            try:
                if ARRAYS not in msg.content or METRICS not in msg.content:
                    raise UpdateRejected(f"site {name}: reply lacks the '{ARRAYS}' or '{METRICS}' record.")
                arrays = numpy_views(msg.content[ARRAYS])  # type: ignore[arg-type]  # views: no second copy
                metrics = dict(msg.content[METRICS])  # type: ignore[arg-type]
                validate_update(name, arrays, metrics.get(NUM_EXAMPLES), self.expected)
                bn_of[name] = self._bn_stats(name, msg, metrics)
            except (UpdateRejected, TypeError, ValueError) as err:
                self.reject(server_round, name, str(err))
                continue
            candidates.append((name, arrays, msg))
        # By site name, not arrival order: float sums depend on order, and a run must not depend on which site
        # answered first (otherwise the same seed gives a different model whenever the timing differs).
        candidates.sort(key=lambda c: c[0])
        kept = self._drop_norm_outliers(server_round, candidates)
        weights = capped_weights([self._claimed(server_round, name, msg) for name, _, msg in kept], self.weight_cap)
        kept, weights = self._drop_heavy_contributions(server_round, kept, weights)
        for (name, arrays, msg), weight in zip(kept, weights):
            metrics = dict(msg.content[METRICS])  # type: ignore[arg-type]
            site = self._site(name)
            site.train[server_round] = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
            site.train[server_round]["weight"] = weight
            site.bytes_sent[server_round] = payload_bytes(msg.content)
            if bn_of.get(name):
                self.bn_registry.update(name, server_round, bn_of[name], int(metrics[BN_SAMPLES]))  # type: ignore
            accepted.append((arrays, weight))
            losses.append((float(metrics.get("train-loss", math.nan)), weight))
        if len(accepted) < self.min_sites:
            log.warning("round %d: only %d valid updates (min-sites %d): the global model is kept unchanged.",
                        server_round, len(accepted), self.min_sites)
            return None, None
        n = sum(w for _, w in losses)
        summary = MetricRecord({"train-loss": sum(l * w for l, w in losses) / n, "sites": len(accepted)})
        return from_numpy(pool_shared_bn(accepted, weighted_average(accepted))), summary  # bn-mode=shared: total var

    def _claimed(self, server_round: int, name: str, msg: Message) -> float:
        """The site's example count, never more than it first reported (a count may not grow during a run)."""
        claimed = float(msg.content[METRICS][NUM_EXAMPLES])  # type: ignore[index, arg-type]
        cap = self.count_cap.setdefault(name, claimed)
        if claimed > cap:
            log.warning("round %d: site %s claims %g examples, more than the %g it first reported; counted as %g",
                        server_round, name, claimed, cap, cap)
            return cap
        return claimed

    def _drop_heavy_contributions(self, server_round: int, kept: list, weights: list[float]) -> tuple[list, list]:
        """The outlier rule on each update's weighted contribution (weight x distance), not its norm alone."""
        if self.reference is None or self.norm_outlier_factor <= 0 or len(kept) < 2:
            return kept, weights
        contributions = [w * update_distance(arrays, self.reference) for (_, arrays, _), w in zip(kept, weights)]
        out, out_weights = [], []
        for item, weight, contribution, median in zip(kept, weights, contributions,
                                                       norm_outliers(contributions, self.norm_outlier_factor)):
            if median is None:
                out.append(item)
                out_weights.append(weight)
            else:
                self.reject(server_round, item[0], f"site {item[0]}: weighted contribution {contribution:.3g} "
                             f"(weight x distance) is more than {self.norm_outlier_factor:g} x the other sites' "
                             f"median {median:.3g} (norm-outlier-factor).")
        return out, out_weights

    def _bn_stats(self, name: str, msg: Message, metrics: dict) -> dict[str, np.ndarray]:
        """The reply's validated BN statistics ({} when this run expects none, or the site withheld them);
        raises UpdateRejected."""
        if self.bn_expected and BN_STATS not in msg.content and WITHHELD in msg.content \
                and "bn-stats" in msg.content[WITHHELD]:
            return {}  # the site's policy or its image count kept them at the site
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
        for name, msg in self._ok_replies(server_round, replies):
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
