"""The egress whitelist: what a site is allowed to send, checked before every reply leaves.

Privacy is the product: no pixel, feature map or per-image prediction may leave a site.
A reply may hold only (1) the shared weights, under exactly the expected names and shapes,
(2) scalar metrics from a fixed list (aggregates: counts, loss, AUC), (3) the site's
name, and (4) in its own record, the per-channel BN running statistics of the named
layers (aggregates over all the site's training images), again with exact shapes. Lists are refused in metrics and config values, because a list is how a per-image
vector would be smuggled out. (5) A few named aggregate arrays in their own records, each
with an exact name and shape (`records`): the HU histogram in the fixed bins and the
projected feature moments (`common/harmonize.py`, `common/feature_shift.py`); their shapes
do not depend on the number of images, so they cannot carry one row per image. (6) The
`withheld` record: which of those aggregates the site chose not to send, each with a reason
code. The site builds the policy from its own site policy and its own model
(`fedrad.client.policy`), never from the coordinator's message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedrad.common.harmonize import N_BINS
from fedrad.common.records import (
    HARMONIZED,
    HISTOGRAM,
    INTENSITY,
    MOMENTS,
    RAW,
    WITHHELD,
    WITHHOLDABLE,
    Description,
    moment_keys,
)


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
    records: Mapping[str, Mapping[str, tuple[int, ...]]] = field(default_factory=dict)  # record -> {name: shape}

    @classmethod
    def build(cls, arrays: Mapping[str, tuple[int, ...]], metrics: Iterable[str],
              bn_stats: Mapping[str, tuple[int, ...]] | None = None, *,
              records: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None) -> EgressPolicy:
        return cls(arrays=dict(arrays), metrics=frozenset(metrics), bn_stats=dict(bn_stats or {}),
                   records={name: dict(shapes) for name, shapes in (records or {}).items()})


def aggregate_records(kind: str, shift_dim: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """The aggregate array records a reply of this kind may carry, with exact names and shapes.

    `reference` query: the HU histogram in the fixed bins. `shift` query: feature moments of
    the pretrained model on raw and on harmonised inputs. `evaluate`: feature moments of the
    current model. `train`: none. With shift-dim 0 no moments at all.
    """
    def moment_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
        mean, cov = moment_keys(prefix)
        return {mean: (shift_dim,), cov: (shift_dim, shift_dim)}

    if kind == "reference":
        return {INTENSITY: {HISTOGRAM: (N_BINS,)}}
    if shift_dim and kind == "shift":
        return {MOMENTS: {**moment_shapes(RAW), **moment_shapes(HARMONIZED)}}
    if shift_dim and kind == "evaluate":
        return {MOMENTS: moment_shapes("")}
    return {}


SCALAR_TYPES = {"int", "float"}
CONFIG_TYPES = {"str", "int", "float", "bool"}


def check_egress(description: Description, policy: EgressPolicy, *, site: str) -> None:
    """Raise EgressError naming the site and the offending record/key, or return None."""
    allowed = {policy.array_record: "arrays", policy.metric_record: "metrics", policy.config_record: "config",
               WITHHELD: "config"}
    config_keys = {policy.config_record: policy.config, WITHHELD: frozenset(WITHHOLDABLE)}
    shapes = {policy.array_record: policy.arrays}
    if policy.bn_stats:
        allowed[policy.bn_record] = "arrays"
        shapes[policy.bn_record] = policy.bn_stats
    allowed.update({name: "arrays" for name in policy.records})
    shapes.update(policy.records)
    for name, (kind, entries) in description.items():
        if allowed.get(name) != kind:
            raise EgressError(f"site {site}: record '{name}' of kind {kind} is not on the egress whitelist "
                              f"(allowed: {sorted(allowed)}).")
        if kind == "arrays":
            expected = shapes[name]
            what = ("a shared weight" if name == policy.array_record else "a whitelisted BN statistic"
                    if name == policy.bn_record else f"a whitelisted '{name}' aggregate")
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
                if key not in config_keys[name] or type_name not in CONFIG_TYPES:
                    raise EgressError(f"site {site}: config value '{key}' ({type_name}) is not on the whitelist.")
