"""The typed run configuration: `[tool.flwr.app.config]` (kebab-case) -> `RunConfig` -> code.

Flower hands the ServerApp `context.run_config` (pyproject values with `--run-config`
overrides); `fedrad simulate` reads the same table from pyproject.toml and applies its own
overrides. Either way the dict passes through `RunConfig.from_run_config` once, which checks
names, types and ranges, so nothing downstream reads raw strings. The coordinator sends
`to_run_config()` to the sites inside every message, so a site always trains with the
coordinator's settings (in simulation the sites have no run config of their own).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from fedrad.common.covariates import parse_covariates
from fedrad.common.finetune import BN_MODES, check_freeze_blocks
from fedrad.common.preprocess import SLICE_MODES

AUGMENTS = ("dihedral", "none")
PREFIX_BN = ("pretrained", "site")
HARMONIZE = ("off", "quantile", "landmarks", "median")
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("classification", "survival")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a federated run. Field `lr_max` is run-config key `lr-max`, and so on."""

    num_server_rounds: int = 5
    bn_mode: str = "fedbn"  # fedbn: BN at each site; silobn: BN affine averaged, stats local; shared: all (FedAvg)
    bn_shrink: float = 0.0  # n0 images: per-site BN statistics shrunk toward the pooled ones by n/(n+n0); 0 = off
    freeze_blocks: int = 14  # freeze stem + first K units (meaning and range: common/finetune.py)
    lr_max: float = 0.003  # learning rate of the classifier
    lr_decay: float = 0.5  # gamma: each level below the classifier gets gamma times the rate above
    local_epochs: int = 2
    augment: str = "none"  # dihedral: random flips/90-degree rotations (8 exact views, 8 cached prefixes); none
    feature_cache: bool = True  # compute the frozen prefix once per image (and view), reuse every epoch/round
    prefix_bn: str = "pretrained"  # BN of the frozen prefix: ImageNet statistics, or re-estimated on the site's images
    cache_memory_mb: int = 512  # in-memory layer of the feature cache (per site process); 0 = disk only
    device: str = "auto"  # auto: CUDA when present (bf16 autocast, channels-last), else CPU
    batch_size: int = 32
    weight_decay: float = 0.0001
    spacing_mm: float = 0.5  # every image is resampled to this pixel spacing (mm); 0 = the coordinator picks the sites' median
    fov_mm: float = 48.0  # physical field of view around the lesion (mm); CNN input = fov/spacing px
    seed: int = 0
    min_sites: int = 2  # a round needs at least this many sites to reply
    round_timeout: float = 3600.0  # seconds the coordinator waits for replies in a round
    rejoin_wait: float = 60.0  # before a round, seconds to wait for a site lost in the last one to reconnect (0 = off)
    norm_outlier_factor: float = 10.0  # reject an update > this x the others' median distance from the global (0 = off)
    weight_cap: float = 10.0  # a site's averaging weight is at most this x the round's median weight (0 = off)
    dp_clip: float = 0.0  # differential privacy: clip each site's update of the shared tensors to this L2 norm (0 = off)
    dp_noise: float = 1.0  # ... and add Gaussian noise of std dp-noise x dp-clip (the noise multiplier)
    dp_delta: float = 1e-5  # the delta at which the report states the run's epsilon
    logit_adjust: float = 0.0  # tau of the logit-adjusted loss CE(logits + tau log pi_site); 1 with bn-mode=shared
    label_shift: bool = True  # last round: sites calibrate (BCTS), estimate their prior (EM, BBSE), correct, personalise
    bcts_balanced: bool = False  # BCTS fit weights each class equally (n / (K n_y) per image); false = unweighted
    personalise_steps: int = 50  # last round: L-BFGS steps fitting a site-only copy of the decision layer (0 = off)
    personalise_l2: float = 1.0  # pull of that copy toward the global decision layer (lambda/2 ||W - W_global||^2)
    disagreement_threshold: float = 0.15  # flag concept shift when this fraction of decisions differ
    data_dir: str = ""  # simulation only: folder with one sub-folder per site
    out_dir: str = "runs/latest"  # where the coordinator writes report.json / report.md
    work_dir: str = ""  # simulation only: root of the sites' work folders ("" = <out-dir>/sites)
    harmonize: str = "off"  # map each site's HU onto the federated reference: quantile | landmarks (Nyúl–Udupa) | median
    harmonize_split_hu: float = -1024.0  # > -1024: match below / above this HU separately (e.g. -400: lung vs tissue)
    shift_dim: int = 16  # shift score: feature moments in this many projected dimensions (0 = no shift score)
    slice_mode: str = "largest"  # series rows: largest (axial slice of largest lesion area) | 2.5d | orthogonal
    slab_mm: float = 5.0  # slice-mode 2.5d: the neighbour planes' distance from the lesion centre (mm)
    slices_per_lesion: int = 1  # slice-mode largest: k axial slices of largest lesion area (train: one, eval: mean)
    task: str = "classification"  # classification (label, 2-class head) | survival (time + event, 1-output Cox head)
    covariates: str = ""  # task = survival: mask-derived covariates beside the CNN in the Cox head ("log-volume")
    covariate_lr: float = 0.2  # learning rate of the covariates' coefficients (common/covariates.py)

    def __post_init__(self) -> None:
        check_freeze_blocks(self.freeze_blocks)
        checks = [
            (self.num_server_rounds >= 1, "num-server-rounds must be >= 1"),
            (self.bn_mode in BN_MODES, f"bn-mode must be one of {BN_MODES}"),
            (self.bn_shrink >= 0, "bn-shrink must be >= 0 (images; 0 = each site's own BN statistics)"),
            (self.lr_max > 0, "lr-max must be > 0"),
            (0 < self.lr_decay <= 1, "lr-decay must be in (0, 1]"),
            (self.local_epochs >= 1, "local-epochs must be >= 1"),
            (self.augment in AUGMENTS, f"augment must be one of {AUGMENTS}"),
            (self.prefix_bn in PREFIX_BN, f"prefix-bn must be one of {PREFIX_BN}"),
            (self.cache_memory_mb >= 0, "cache-memory-mb must be >= 0"),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (self.batch_size >= 2, "batch-size must be >= 2 (BatchNorm needs two samples)"),
            (self.weight_decay >= 0, "weight-decay must be >= 0"),
            (self.spacing_mm >= 0, "spacing-mm must be > 0 (or 0: the coordinator picks the sites' median)"),
            (self.fov_mm >= 8 * self.spacing_mm, "fov-mm must be at least 8 pixels of spacing-mm"),
            (self.min_sites >= 1, "min-sites must be >= 1"),
            (self.round_timeout > 0, "round-timeout must be > 0"),
            (self.rejoin_wait >= 0, "rejoin-wait must be >= 0"),
            (self.norm_outlier_factor == 0 or self.norm_outlier_factor > 1,
             "norm-outlier-factor must be 0 (off) or > 1"),
            (self.weight_cap == 0 or self.weight_cap >= 1, "weight-cap must be 0 (off) or >= 1"),
            (self.dp_clip >= 0, "dp-clip must be >= 0 (0 = no differential privacy)"),
            (self.dp_noise >= 0, "dp-noise must be >= 0"),
            (0 < self.dp_delta < 1, "dp-delta must be in (0, 1)"),
            (self.logit_adjust >= 0, "logit-adjust must be >= 0"),
            (self.personalise_steps >= 0, "personalise-steps must be >= 0"),
            (self.personalise_l2 > 0, "personalise-l2 must be > 0"),
            (0 < self.disagreement_threshold <= 1, "disagreement-threshold must be in (0, 1]"),
            (self.harmonize in HARMONIZE, f"harmonize must be one of {HARMONIZE}"),
            (0 <= self.shift_dim <= 256, "shift-dim must be between 0 (off) and 256"),
            (self.slice_mode in SLICE_MODES, f"slice-mode must be one of {SLICE_MODES}"),
            (self.slab_mm > 0, "slab-mm must be > 0"),
            (1 <= self.slices_per_lesion <= 16, "slices-per-lesion must be between 1 and 16"),
            (self.slices_per_lesion == 1 or self.slice_mode == "largest",
             "slices-per-lesion > 1 needs slice-mode = largest (the other modes already use several planes)"),
            (self.task in TASKS, f"task must be one of {TASKS}"),
            (self.covariate_lr > 0, "covariate-lr must be > 0"),
            (not self.covariates or self.task == "survival",
             "covariates (mask-derived, beside the CNN in the Cox head) need task = survival"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self!r}.")
        parse_covariates(self.covariates)

    @property
    def covariate_names(self) -> tuple[str, ...]:
        """Run-config `covariates` as names (`fedrad.common.covariates.COVARIATES`); () = the CNN-only head."""
        return parse_covariates(self.covariates)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys; unknown keys and wrong types are refused by name."""
        by_key = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        types = get_type_hints(cls)
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ValueError(f"Unknown run-config key(s) {unknown}; known keys: {sorted(by_key)}.")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = by_key[key]
            values[name] = _coerce(key, value, types[name])
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case dict (the form of `[tool.flwr.app.config]` and of a ConfigRecord)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def image_size(self) -> int:
        """CNN input side in pixels."""
        if self.spacing_mm == 0:
            raise ValueError("spacing-mm = 0 (auto) has no image size until the coordinator has chosen the "
                             "reference spacing from the sites' spacing summaries.")
        return round(self.fov_mm / self.spacing_mm)


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise TypeError(f"Run-config key '{key}' must be {kind.__name__}; got {value!r} ({type(value).__name__}).")
    return value


def project_run_config(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table of our pyproject.toml, or {} when not installed from source."""
    if not pyproject.is_file():
        return {}
    with pyproject.open("rb") as f:
        return dict(tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def load_run_config(overrides: Sequence[str] = ()) -> RunConfig:
    """pyproject's [tool.flwr.app.config], then `--run-config "k=v ..."` overrides (Flower's own syntax)."""
    from flwr.common.config import parse_config_args

    values = project_run_config()
    values.update(parse_config_args(list(overrides)) if overrides else {})
    return RunConfig.from_run_config(values)
