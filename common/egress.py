"""The egress whitelist: what a site is allowed to send, checked before every reply leaves.

Privacy is the product: no pixel, feature map or per-image prediction may leave a site.
A reply may hold only (1) the shared weights, under exactly the expected names and shapes,
(2) scalar metrics from a fixed list (aggregates: counts, loss, AUC), (3) the site's
name, and (4) in its own record, the per-channel BN running statistics of the named
layers (aggregates over all the site's training images), again with exact shapes. Lists are refused in metrics and config values, because a list is how a per-image
vector would be smuggled out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from common.records import Description


class EgressError(RuntimeError):
    """A reply broke the whitelist; it is not sent."""


@dataclass(frozen=True)
class EgressPolicy:
    """Allowed content of a site's reply."""

    arrays: Mapping[str, tuple[int, ...]]  # shared weight name -> exact shape
    metrics: frozenset[str]
    config: frozenset[str] = frozenset({"name"})
    array_record: str = "arrays"
    metric_record: str = "metrics"
    config_record: str = "site"
    bn_stats: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # BN statistic name -> exact shape
    bn_record: str = "bn-stats"

    @classmethod
    def build(cls, arrays: Mapping[str, tuple[int, ...]], metrics: Iterable[str],
              bn_stats: Mapping[str, tuple[int, ...]] | None = None) -> EgressPolicy:
        return cls(arrays=dict(arrays), metrics=frozenset(metrics), bn_stats=dict(bn_stats or {}))


SCALAR_TYPES = {"int", "float"}
CONFIG_TYPES = {"str", "int", "float", "bool"}


def check_egress(description: Description, policy: EgressPolicy, *, site: str) -> None:
    """Raise EgressError naming the site and the offending record/key, or return None."""
    allowed = {policy.array_record: "arrays", policy.metric_record: "metrics", policy.config_record: "config"}
    shapes = {policy.array_record: policy.arrays}
    if policy.bn_stats:
        allowed[policy.bn_record] = "arrays"
        shapes[policy.bn_record] = policy.bn_stats
    for name, (kind, entries) in description.items():
        if allowed.get(name) != kind:
            raise EgressError(f"site {site}: record '{name}' of kind {kind} is not on the egress whitelist "
                              f"(allowed: {sorted(allowed)}).")
        if kind == "arrays":
            expected = shapes[name]
            what = "a shared weight" if name == policy.array_record else "a whitelisted BN statistic"
            for key, shape in entries.items():
                if key not in expected:
                    raise EgressError(f"site {site}: array '{key}' is not {what}; refused.")
                if tuple(shape) != tuple(expected[key]):  # type: ignore[arg-type]
                    raise EgressError(f"site {site}: array '{key}' has shape {shape}, "
                                      f"expected {tuple(expected[key])}; refused.")
        elif kind == "metrics":
            for key, type_name in entries.items():
                if key not in policy.metrics:
                    raise EgressError(f"site {site}: metric '{key}' is not on the whitelist {sorted(policy.metrics)}.")
                if type_name not in SCALAR_TYPES:
                    raise EgressError(f"site {site}: metric '{key}' must be a scalar, got {type_name}; refused.")
        else:
            for key, type_name in entries.items():
                if key not in policy.config or type_name not in CONFIG_TYPES:
                    raise EgressError(f"site {site}: config value '{key}' ({type_name}) is not on the whitelist.")
