"""The records that travel between a site and the coordinator: names, conversions, sizes.

This is the one module of `common/` that imports Flower. Record and key names are
constants here so that the ClientApp, the strategy and the egress check agree on them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedrad.common.version import __version__, check_same_version

# Record names inside a message's RecordDict.
ARRAYS = "arrays"  # the shared weights (coordinator -> site and back)
CONFIG = "config"  # run config (coordinator -> site)
METRICS = "metrics"  # aggregates a site reports (counts, loss, AUC, ...)
SITE = "site"  # who is replying: {"name": site folder name}
BN_STATS = "bn-stats"  # site -> coordinator: per-channel BN running mean/var of the adapted layers
BN_POOLED = "bn-pooled"  # coordinator -> site (train, bn-shrink > 0): the registry's pooled BN mean/var per layer
LABEL_SHIFT = "label-shift"  # coordinator -> site (evaluate): the training prior {"prior-train-<c>": float}
REFERENCE = "reference"  # coordinator -> site: pooled HU histogram and/or the shift projection
INTENSITY = "intensity"  # site -> coordinator (query): its HU histogram in the fixed bins
MOMENTS = "moments"  # site -> coordinator: mean/covariance of its projected penultimate features
WITHHELD = "withheld"  # site -> coordinator: {what: reason code} for each aggregate the site chose not to send
# What a site may withhold (the keys of WITHHELD), each for a fixed reason code (fedrad.common.codes).
WITHHOLDABLE = ("bn-stats", "class-counts", "test-metrics", "label-shift", "histogram", "moments")

# Query messages (before round 1): run config plus what the coordinator asks for.
QUERY_KIND = "fedrad-query"  # config key: one of QUERY_KINDS
QUERY_KINDS = ("reference", "shift")  # histogram + spacing summary; feature moments raw / harmonised
# Array keys.
HISTOGRAM = "histogram"  # in INTENSITY: int64 counts (N_BINS,)
REFERENCE_HISTOGRAM = "reference-histogram"  # in REFERENCE: the pooled counts (N_BINS,)
PROJECTION = "projection"  # in REFERENCE: (shift-dim, 1280) float32, orthonormal rows
RAW, HARMONIZED = "raw/", "harmonized/"  # prefixes of the moments keys in a shift-query reply

# Keys of the config record (coordinator -> site) that are not run config.
FEDERATION_ID = "federation-id"  # one id per experiment, kept across coordinator restarts; names a site's local state
FEDRAD_VERSION = "fedrad-version"  # the coordinator's fedrad version, in every message; a site on another refuses
SERVER_ROUND = "server-round"  # put there by Flower
NOT_RUN_CONFIG = (SERVER_ROUND, FEDERATION_ID, FEDRAD_VERSION, QUERY_KIND)
PRIOR_TRAIN = "prior-train-{c}"  # in LABEL_SHIFT: π_train[c], one key per class

# Metric keys a site may send.
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
BN_SAMPLES = "bn-samples"  # images the site's BN statistics were estimated on (the registry's weight)
CLASS_COUNTS = ("n-class-0", "n-class-1")  # labelled images a site trained on, per class: the training prior
LABEL_SHIFT_METRICS = (  # last round only (fedrad.common.shift_flags, fedrad.client.site_shift): scalars, never per image
    "n-unlabelled", "prior-em", "prior-bbse", "prior-site", "bcts-temperature", "bcts-bias",
    "ece-uncorrected", "ece-corrected", "ece-floor", "brier-uncorrected", "brier-corrected",
    "balanced-accuracy-uncorrected", "balanced-accuracy-corrected",
    "auc-personalised", "disagreement", "concept-shift", "label-shift-flags", "prior-labelled", "n-deploy-eval",
    *(f"{what}-deploy-{method}" for method in ("none", "labelled", "em", "bbse", "oracle")
      for what in ("prior", "ece", "brier", "balanced-accuracy")))  # on the deployment evaluation set
RELIABILITY_BINS = 10  # equal-width bins of P(malignant) (fedrad.common.metrics.reliability_bins)


def reliability_keys(name: str, n_bins: int = RELIABILITY_BINS) -> tuple[str, ...]:
    """Metric keys of one reliability diagram: `rel-<name>-<bin>-n|conf|pos` (count, mean P, fraction positive)."""
    return tuple(f"rel-{name}-{b}-{part}" for b in range(n_bins) for part in ("n", "conf", "pos"))


# Last round: the test split's reliability diagram before and after correction, bins of >= min-count images only.
RELIABILITY_METRICS = (*reliability_keys("uncorrected"), *reliability_keys("corrected"))
# task = survival (fedrad.client.survival_site): the test split's C-index with Harrell's pair counts (which add up
# across sites into the federated C-index), its number of events, td-AUC at its median follow-up, integrated Brier.
C_INDEX, TD_AUC, IBS, N_EVENTS = "c-index", "td-auc", "integrated-brier", "n-events"
PAIRS = ("pairs-concordant", "pairs-discordant", "pairs-tied-risk")
SURVIVAL_METRICS = (C_INDEX, *PAIRS, N_EVENTS, TD_AUC, IBS)
TRAIN_METRICS = (NUM_EXAMPLES, "train-loss", "n-train", "n-test", "n-skipped", "seconds", BN_SAMPLES, *CLASS_COUNTS)
EVAL_METRICS = (NUM_EXAMPLES, "auc", "balanced-accuracy", "ece", "test-loss", *SURVIVAL_METRICS, *LABEL_SHIFT_METRICS,
                *RELIABILITY_METRICS)
N_FEATURES = "n-features"  # images the feature moments were taken over
REFERENCE_METRICS = ("n-images", "n-pixels", "n-constant", "spacing-median-mm", "spacing-p05-mm",
                     "spacing-p95-mm")  # spacing summary and histogram counts of a reference-query reply

# A description of a RecordDict: record name -> (kind, {key: shape tuple or value type name}).
Description = dict[str, tuple[str, dict[str, object]]]


def moment_keys(prefix: str = "") -> tuple[str, str]:
    """Array keys of a site's feature moments: (mean (k,), covariance (k, k))."""
    return f"{prefix}feature-mean", f"{prefix}feature-cov"


def config_record(run_config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> ConfigRecord:
    """The config record of a coordinator message: the run config, `extra` keys, and the coordinator's version."""
    return ConfigRecord({**run_config, **(extra or {}), FEDRAD_VERSION: __version__})


def run_config_of(record: ConfigRecord) -> dict[str, Any]:
    """The run config in a coordinator's config record; refuses one from another fedrad version."""
    check_same_version(record.get(FEDRAD_VERSION))
    return {k: v for k, v in record.items() if k not in NOT_RUN_CONFIG}


def prior_record(prior: np.ndarray) -> ConfigRecord:
    """The LABEL_SHIFT record: the training prior π_train, {"prior-train-<c>": π_train[c]}."""
    return ConfigRecord({PRIOR_TRAIN.format(c=c): float(p) for c, p in enumerate(prior)})


def prior_from_record(record: ConfigRecord) -> np.ndarray:
    """π_train from a LABEL_SHIFT record (the inverse of `prior_record`), one entry per class."""
    try:
        return np.array([float(record[PRIOR_TRAIN.format(c=c)]) for c in range(len(CLASS_COUNTS))])  # type: ignore[arg-type]
    except KeyError as missing:
        raise ValueError(f"the {LABEL_SHIFT} record has no {missing} key; keys sent: {sorted(record)}") from None


def to_array_record(state: Mapping[str, torch.Tensor], keys: list[str]) -> ArrayRecord:
    """The named subset of a state dict, in the given key order."""
    return ArrayRecord({k: state[k].detach().cpu() for k in keys})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> {key: tensor} (copies, so the caller may modify them)."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> {key: ndarray}, for the coordinator's arithmetic."""
    return {k: v.numpy() for k, v in record.items()}


def numpy_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> {key: read-only ndarray over the record's own bytes}: `to_numpy` without the copy.

    The coordinator holds every site's reply until it aggregates; `to_numpy` then copies each
    reply's arrays once more (with 100 sites and a 5.9 MB update, 584 MB measured). A view
    shares the bytes the reply already holds, so the same values cost nothing twice. The views
    are read-only (numpy refuses a write) and keep their record's bytes alive; an array that
    is not a plain C-ordered `.npy` (Flower's own serialisation) is copied as `to_numpy` does.
    """
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        view = _npy_view(array.data) if array.stype == "numpy.ndarray" and isinstance(array.data, bytes) else None
        out[key] = view if view is not None else array.numpy()
    return out


def _npy_view(data: bytes) -> np.ndarray | None:
    """A read-only ndarray over `.npy` bytes (no copy); None for Fortran order or object arrays."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except ValueError:
        return None
    if fortran or dtype.hasobject:
        return None
    count = int(np.prod(shape)) if shape else 1
    return np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(shape)


def from_numpy(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """{key: ndarray} -> ArrayRecord, keeping key order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it on the wire (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


def describe(content: RecordDict) -> Description:
    """What a RecordDict holds, without the values: used by the egress check."""
    out: Description = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = ("arrays", {k: tuple(a.shape) for k, a in record.items()})
        elif isinstance(record, MetricRecord):
            out[name] = ("metrics", {k: type(v).__name__ for k, v in record.items()})
        elif isinstance(record, ConfigRecord):
            out[name] = ("config", {k: type(v).__name__ for k, v in record.items()})
        else:
            out[name] = (type(record).__name__, {})
    return out
