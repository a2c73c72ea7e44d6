"""The site's own policy: what this hospital will send and take part in, read from one file it owns.

A data-protection officer reads one TOML file and knows what can leave the site; the
site's audit log (`fedrad.client.egress_log`) then shows what did. The coordinator's message
never widens it: the site decides from this policy and its own model which records, names
and shapes may go out (`outgoing`), and a request outside the policy is refused with a
fixed code (`fedrad.common.codes`).

    # site-policy.toml (every key optional; these are the defaults)
    bn-modes = ["fedbn", "silobn", "shared"]  # which BatchNorm modes the site takes part in
    freeze-blocks = [-1, 17]       # accepted range of freeze-blocks (inclusive)
    send-bn-stats = true           # per-channel BN statistics of the adapted layers (the BN registry)
    send-histogram = true          # the HU histogram and spacing summary (federated harmonisation)
    send-moments = true            # projected feature moments (the shift score)
    send-label-shift = true        # last-round label-shift scalars (priors, ECE, disagreement, ...)
    max-shift-dim = 16             # the largest feature projection the site sends moments of
    min-count = 11                 # no aggregate of fewer images leaves the site (small-cell rule)
    require-dp = false             # refuse runs without differential privacy on the shared update
    min-dp-noise = 0.0             # ... and with a noise multiplier below this

Where it comes from: `fedrad site --policy FILE` in a deployment (node config
`policy-file`); `site-policy.toml` in the site's data folder in simulation; else the
defaults above.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedrad.common.config import RunConfig
from fedrad.common.finetune import BN_MODES, FULL_FINETUNE, LINEAR_PROBE

POLICY_FILE = "site-policy.toml"  # in the site's data folder (simulation)


class PolicyError(ValueError):
    """The policy file cannot be read or holds an unknown key or a bad value (names the file)."""


class PolicyRefused(RuntimeError):
    """The coordinator asked for something outside this site's policy."""


@dataclass(frozen=True)
class SitePolicy:
    """What this site sends; field `min_count` is policy key `min-count`, and so on."""

    bn_modes: tuple[str, ...] = BN_MODES
    freeze_blocks: tuple[int, int] = (FULL_FINETUNE, LINEAR_PROBE)
    send_bn_stats: bool = True
    send_histogram: bool = True
    send_moments: bool = True
    send_label_shift: bool = True
    max_shift_dim: int = 16
    min_count: int = 11
    require_dp: bool = False
    min_dp_noise: float = 0.0
    source: str = "defaults"  # the file it was read from (not a policy key)

    def __post_init__(self) -> None:
        low, high = self.freeze_blocks
        problems = [
            (set(self.bn_modes) <= set(BN_MODES), f"bn-modes must be a subset of {list(BN_MODES)}"),
            (FULL_FINETUNE <= low <= high <= LINEAR_PROBE,
             f"freeze-blocks must be [low, high] within [{FULL_FINETUNE}, {LINEAR_PROBE}]"),
            (self.max_shift_dim >= 0, "max-shift-dim must be >= 0"),
            (self.min_count >= 1, "min-count must be >= 1"),
            (self.min_dp_noise >= 0, "min-dp-noise must be >= 0"),
        ]
        for ok, message in problems:
            if not ok:
                raise PolicyError(f"{self.source}: {message}; got {self.as_dict()}")

    def as_dict(self) -> dict[str, Any]:
        """The policy in its file's kebab-case keys (what the hash covers)."""
        return {f.name.replace("_", "-"): _plain(getattr(self, f.name)) for f in fields(self) if f.name != "source"}

    def sha256(self) -> str:
        """Hash of the effective policy (canonical JSON): written with every line of the audit log."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def refusals(self, cfg: RunConfig) -> list[str]:
        """Why this run is outside the policy ([] = the site takes part). Each names the setting."""
        low, high = self.freeze_blocks
        out = []
        if cfg.bn_mode not in self.bn_modes:
            out.append(f"bn-mode {cfg.bn_mode!r} is not one of the site's {list(self.bn_modes)}")
        if not low <= cfg.freeze_blocks <= high:
            out.append(f"freeze-blocks {cfg.freeze_blocks} is outside the site's [{low}, {high}]")
        if self.require_dp and (cfg.dp_clip <= 0 or cfg.dp_noise < self.min_dp_noise):
            out.append(f"the site requires differential privacy (dp-clip > 0, dp-noise >= {self.min_dp_noise:g}); "
                       f"the run has dp-clip {cfg.dp_clip:g}, dp-noise {cfg.dp_noise:g}")
        return out

    def check(self, cfg: RunConfig) -> None:
        """Raise PolicyRefused when the run is outside the policy."""
        refusals = self.refusals(cfg)
        if refusals:
            raise PolicyRefused("; ".join(refusals))

    def moments_min_count(self, shift_dim: int) -> int:
        """Images needed behind feature moments: a covariance of fewer than 2 x dim images reveals their span."""
        return max(self.min_count, 2 * shift_dim)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_policy(path: Path | None) -> SitePolicy:
    """The policy in `path` (None, or a missing simulation file: the defaults); errors name the file and key."""
    if path is None:
        return SitePolicy()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"{path}: site policy file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PolicyError(f"{path}: not a readable TOML file ({err})") from None
    known = {f.name.replace("_", "-"): f for f in fields(SitePolicy) if f.name != "source"}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PolicyError(f"{path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    values: dict[str, Any] = {}
    defaults = SitePolicy()
    for key, value in raw.items():
        name = known[key].name
        default = getattr(defaults, name)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, type(default[0])) for v in value):
                raise PolicyError(f"{path}: '{key}' must be a list like {list(default)}; got {value!r}")
            if name == "freeze_blocks" and len(value) != 2:
                raise PolicyError(f"{path}: 'freeze-blocks' must be [low, high]; got {value!r}")
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(default):
            raise PolicyError(f"{path}: '{key}' must be {type(default).__name__}; got {value!r}")
        values[name] = value
    return dataclasses.replace(defaults, source=str(path), **values)


def site_policy(node_config: dict[str, Any], site_folder: Path) -> SitePolicy:
    """The site's policy: node-config `policy-file` (deployment), else `site-policy.toml` in its folder, else defaults."""
    if "policy-file" in node_config and str(node_config["policy-file"]):
        return load_policy(Path(str(node_config["policy-file"])))
    in_folder = Path(site_folder) / POLICY_FILE
    return load_policy(in_folder if in_folder.is_file() else None)


class SmallCount(RuntimeError):
    """Too few images behind what this message would send (the policy's min-count)."""


WHAT_TRAVELS_BEGIN = "<!-- what-travels: generated by `fedrad policy` from fedrad.client.policy; do not edit -->"
WHAT_TRAVELS_END = "<!-- /what-travels -->"


def what_travels(policy: SitePolicy | None = None) -> str:
    """The table of every record a site may send under `policy`, from the code the site enforces.

    The README's "What travels" table is this function's output for the default policy (a
    test compares them), so the documentation cannot say less than what leaves.
    """
    from fedrad.common.egress import aggregate_records
    from fedrad.common.finetune import SHARED_BN_PARTS
    from fedrad.common.records import (
        ARRAYS,
        BN_STATS,
        EVAL_METRICS,
        LABEL_SHIFT_METRICS,
        REFERENCE_METRICS,
        RELIABILITY_BINS,
        RELIABILITY_METRICS,
        SITE,
        SURVIVAL_METRICS,
        TRAIN_METRICS,
        WITHHELD,
        WITHHOLDABLE,
    )

    policy = policy or SitePolicy()
    k = policy.max_shift_dim
    histogram = next(iter(aggregate_records("reference", k).values()))
    moments = aggregate_records("evaluate", k).get("moments", {})
    n = policy.min_count

    def modes(part_of: str) -> str:
        return ", ".join(f"{mode}: {sorted(parts) or 'none'}" for mode, parts in SHARED_BN_PARTS.items()
                         if mode in policy.bn_modes) if part_of == "bn" else ""

    def shapes(record: dict) -> str:
        return ", ".join(f"`{key}` {tuple(shape)}" for key, shape in record.items())

    def on(flag: bool) -> str:
        return "yes" if flag else "no (policy)"

    test_keys = [m for m in EVAL_METRICS if m not in LABEL_SHIFT_METRICS and m not in RELIABILITY_METRICS and m not in SURVIVAL_METRICS]
    rows = [
        ("`" + ARRAYS + "`", "train reply", "the shared weights: trainable non-BN tensors of the unfrozen units and "
         f"the head, plus the parts of trainable BN layers the bn-mode shares ({modes('bn')}); exactly the names "
         "and shapes the site's own model shares", "yes", f"≥ {n} labelled training images",
         "yes (dp-clip > 0)"),
        ("`" + BN_STATS + "`", "train reply", "per channel `running_mean`, `running_var` of each adapted BN layer, "
         "with their image count `bn-samples`", on(policy.send_bn_stats), f"≥ {n} training images", "no"),
        ("`metrics`", "train reply", ", ".join(f"`{m}`" for m in TRAIN_METRICS) + " (class counts only when no "
         f"class holds 1 to {n - 1} images)", "yes", f"≥ {n} training images", "no"),
        ("`metrics`", "evaluate reply", ", ".join(f"`{m}`" for m in test_keys), "yes",
         f"≥ {n} test images (else only `num-examples`)", "no"),
        ("`metrics`", "evaluate reply, task = survival", ", ".join(f"`{m}`" for m in SURVIVAL_METRICS)
         + ", `test-loss` (Harrell's pair counts, not risk scores: the coordinator adds them up)", "yes",
         f"≥ {n} test images and ≥ {n} test events (else only `num-examples`)", "no"),
        ("`metrics`", "evaluate reply, last round", f"{len(LABEL_SHIFT_METRICS)} label-shift scalars ("
         + ", ".join(f"`{m}`" for m in LABEL_SHIFT_METRICS[:6]) + ", ...)", on(policy.send_label_shift),
         f"≥ {n} test images; EM/BBSE priors ≥ {n} unlabelled; labelled-count priors only with the class counts", "no"),
        ("`metrics`", "evaluate reply, last round", f"reliability diagrams before and after correction: per bin of "
         f"P(malignant) (of {RELIABILITY_BINS}) the image count, mean prediction and fraction malignant (`rel-…`)",
         on(policy.send_label_shift), f"each bin ≥ {n} test images", "no"),
        ("`intensity`", "reference query", shapes(histogram) + " HU counts in fixed bins; metrics "
         + ", ".join(f"`{m}`" for m in REFERENCE_METRICS) + " (spacing as quantiles)", on(policy.send_histogram),
         f"≥ {n} images", "no"),
        ("`moments`", "shift query, evaluate reply", (shapes(moments) or "none") + f" (shift-dim ≤ {k}, the "
         "projection checked against the run's seed)", on(policy.send_moments),
         f"≥ {policy.moments_min_count(k)} images (max(min-count, 2 × shift-dim))", "no"),
        ("`evaluate.<record>`", "train reply, rounds ≥ 2", "the evaluation of the model the train message carried "
         "(`fedrad.common.piggyback`): the evaluate reply's records under `evaluate.`, checked by the evaluate "
         "reply's whitelist; `train-refused` (a reason code and incident id) instead of the train records when the "
         "site evaluated but did not train", "yes", "as in the evaluate reply", "no"),
        ("`" + WITHHELD + "`", "any reply", "which of " + ", ".join(f"`{w}`" for w in WITHHOLDABLE)
         + " the site kept back, each with a reason code", "yes", "–", "–"),
        ("`" + SITE + "`", "any reply", "`name`: the site's name (checked against its node's key)", "yes", "–", "–"),
        ("error", "a failed reply", "a reason code and a random incident id; never text", "yes", "–", "–"),
    ]
    lines = [WHAT_TRAVELS_BEGIN, "", "| record | in | what (name, shape) | sent | small-count floor | DP noise |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", WHAT_TRAVELS_END]
    return "\n".join(lines)
