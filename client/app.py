"""fedrad ClientApp: one hospital site. Wiring only: read the message, call `client/` and `common/`.

Per message the site (1) reads its own DICOM folder, (2) builds the pretrained model and
loads the coordinator's shared weights plus its own BatchNorm (from the node's state, or
from its own disk after a restart: `fedrad.client.local_state`), (3) trains or evaluates, (4)
keeps its BN in both places, and (5) replies with the shared weights and
scalar aggregates only, after the egress whitelist has checked the reply.

Before round 1 the coordinator may query the site (`query`): for its HU histogram and
spacing summary (the federated intensity reference), then for its feature moments on raw
and harmonised inputs (the shift score). Aggregates only, whitelisted like every reply.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrad.client.cache import cache_folder
from fedrad.client.dataset import SiteData
from fedrad.client.deploy_eval import load_audit
from fedrad.client.features import SiteInputs, site_inputs
from fedrad.client.local_state import LocalStateStore
from fedrad.client.moments import feature_moments, pretrained_moments
from fedrad.client.outputs import SiteOutputs
from fedrad.client.reference import load_inputs, site_intensity
from fedrad.client.site_shift import evaluate_site
from fedrad.client.train import fit, pick_device
from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.egress import EgressPolicy, aggregate_records, check_egress
from fedrad.common.feature_shift import Moments
from fedrad.common.finetune import local_keys, site_bn_stat_keys
from fedrad.common.labelshift import logit_adjustment
from fedrad.common.model import build_model
from fedrad.common.records import (
    ARRAYS,
    BN_SAMPLES,
    BN_STATS,
    CLASS_COUNTS,
    CONFIG,
    EVAL_METRICS,
    FEDERATION_ID,
    HISTOGRAM,
    INTENSITY,
    LABEL_SHIFT,
    METRICS,
    MOMENTS,
    N_FEATURES,
    NUM_EXAMPLES,
    PROJECTION,
    QUERY_KIND,
    QUERY_KINDS,
    REFERENCE,
    REFERENCE_HISTOGRAM,
    REFERENCE_METRICS,
    SITE,
    TRAIN_METRICS,
    describe,
    from_array_record,
    from_numpy,
    moment_keys,
    prior_from_record,
    run_config_of,
    to_array_record,
)
from fedrad.common.sites import discover_sites

LOCAL_STATE = "fedrad-local"  # key in context.state: this site's own BN tensors
log = logging.getLogger("fedrad.site")
app = ClientApp()


def site_folder(context: Context, cfg: RunConfig) -> Path:
    """Deployment: node-config `data-dir` is the site's folder. Simulation: partition i of `data-dir`."""
    if "data-dir" in context.node_config:
        return Path(str(context.node_config["data-dir"]))
    if "partition-id" not in context.node_config or not cfg.data_dir:
        raise ValueError("This site has no data: start the SuperNode with --node-config \"data-dir='/path/to/site'\".")
    sites = discover_sites(Path(cfg.data_dir))
    pid = int(context.node_config["partition-id"])
    if pid >= len(sites):
        raise ValueError(f"partition-id {pid} but {cfg.data_dir} holds only {len(sites)} site folders.")
    return sites[pid]


def own_name(context: Context, folder: Path) -> str:
    """The site's name: as provisioned (deployment node config `site-name`), else its folder's name."""
    return str(context.node_config.get("site-name", folder.resolve().name))


def work_folder(context: Context, cfg: RunConfig, site: str) -> Path:
    """Where the site keeps its own files (summaries, later caches); never sent anywhere."""
    if "work-dir" in context.node_config:
        return Path(str(context.node_config["work-dir"]))
    return Path(cfg.work_dir or Path(cfg.out_dir) / "sites") / site


def local_store(msg: Message, context: Context, cfg: RunConfig, site: str) -> LocalStateStore:
    """This site's per-round BN files for the coordinator's experiment (federation id)."""
    federation = str(msg.content[CONFIG].get(FEDERATION_ID, f"run-{context.run_id}"))
    return LocalStateStore(work_folder(context, cfg, site), federation)


def load_local_state(msg: Message, context: Context, cfg: RunConfig, site: str) -> dict | None:
    """The site's own BN: from the node's memory (same run), else from its disk (restarted daemon or run)."""
    if LOCAL_STATE in context.state:
        return from_array_record(context.state[LOCAL_STATE])  # type: ignore[arg-type]
    server_round = int(msg.content[CONFIG]["server-round"])
    training = msg.metadata.message_type == "train"
    found = local_store(msg, context, cfg, site).latest(server_round - 1 if training else server_round)
    if found is not None:
        log.info("site %s: BatchNorm of round %d restored from its work folder", site, found[0])
    return None if found is None else found[1]


def reference_arrays(msg: Message) -> dict[str, np.ndarray]:
    """What the coordinator sent in its reference record: pooled histogram and/or projection."""
    return {k: v.numpy() for k, v in msg.content[REFERENCE].items()} if REFERENCE in msg.content else {}


def prepare(msg: Message, context: Context) -> tuple[RunConfig, SiteData, EfficientNetLite0, SiteInputs]:
    """Config from the message, the site's data, the model with shared + local weights, its inputs."""
    cfg = RunConfig.from_run_config(run_config_of(msg.content[CONFIG]))
    folder = site_folder(context, cfg)
    name = own_name(context, folder)
    work = work_folder(context, cfg, name)
    data = load_inputs(cfg, folder, reference_arrays(msg).get(REFERENCE_HISTOGRAM), site=name,
                       cache_dir=cache_folder(work))
    data.name = name
    device = pick_device(cfg.device)
    model = build_model(cfg, device)
    inputs = site_inputs(model, cfg, data, work, device)
    state = from_array_record(msg.content[ARRAYS])
    local = load_local_state(msg, context, cfg, data.name)
    if local is not None:
        state.update(local)
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"site {data.name}: the coordinator sent weights this model does not have: {unexpected[:5]}; "
                         "coordinator and site must run the same fedrad version and config.")
    return cfg, data, model, inputs


def reply(msg: Message, data: SiteData, arrays: ArrayRecord | None, metrics: dict[str, float],
          bn_stats: ArrayRecord | None = None, bn_shapes: dict[str, tuple[int, ...]] | None = None,
          moments: Moments | None = None, shift_dim: int = 0) -> Message:
    """Wrap the reply and pass it through the egress whitelist before it may leave.

    `bn_shapes` (from the site's own model) whitelists the BN statistics record by name and shape;
    `moments` go in the `moments` record, whitelisted by `shift_dim`.
    """
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": data.name})})
    allowed = TRAIN_METRICS
    if arrays is not None:
        content[ARRAYS] = arrays
    else:
        allowed = EVAL_METRICS
    if bn_stats is not None:
        content[BN_STATS] = bn_stats
    records = {}
    if moments is not None:
        content[MOMENTS] = from_numpy(dict(zip(moment_keys(), (moments.mean, moments.cov))))
        records = aggregate_records("evaluate", shift_dim)
        allowed = (*allowed, N_FEATURES)
    incoming = {k: tuple(a.shape) for k, a in msg.content[ARRAYS].items()}
    check_egress(describe(content), EgressPolicy.build(incoming, allowed, bn_shapes, records=records),
                 site=data.name)
    return Message(content=content, reply_to=msg)


def write_summary(context: Context, cfg: RunConfig, data: SiteData, extra: dict[str, float]) -> None:
    """The site's own record of what it read and skipped (file names stay here, only counts travel)."""
    folder = work_folder(context, cfg, data.name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "site-summary.json").write_text(json.dumps({**data.summary(), **extra}, indent=2))
    for skipped in data.skipped:
        log.warning("site %s skipped %s: %s", data.name, skipped.file, skipped.reason)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, data, model, inputs = prepare(msg, context)
    server_round = int(msg.content[CONFIG]["server-round"])
    counts = np.bincount(data.y_train, minlength=len(CLASS_COUNTS))  # the site's prior, and its share of π_train
    stats = fit(model, inputs.train, data.y_train, cfg, seed=cfg.seed * 10_000 + server_round,
                device=pick_device(cfg.device),
                logit_offset=logit_adjustment(counts, cfg.logit_adjust) if cfg.logit_adjust else None)
    state = model.state_dict()
    context.state[LOCAL_STATE] = to_array_record(state, local_keys(model, cfg.bn_mode))
    local_store(msg, context, cfg, data.name).save(server_round, {k: state[k] for k in local_keys(model, cfg.bn_mode)})
    write_summary(context, cfg, data, {"round": server_round, **stats, "cache-hits": inputs.cache_hits,
                                       "cache-misses": inputs.cache_misses})
    metrics = {NUM_EXAMPLES: len(data.y_train), "n-train": len(data.y_train), "n-test": len(data.y_test),
               "n-skipped": len(data.skipped), BN_SAMPLES: len(data.y_train), **stats,
               **dict(zip(CLASS_COUNTS, map(int, counts)))}
    bn_keys = site_bn_stat_keys(model)  # the BN layers fit() re-estimated on this site's training images
    bn_stats = to_array_record(state, bn_keys) if bn_keys else None
    return reply(msg, data, to_array_record(state, list(msg.content[ARRAYS].keys())), metrics,
                 bn_stats, {k: tuple(state[k].shape) for k in bn_keys})


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    cfg, data, model, inputs = prepare(msg, context)
    final = int(msg.content[CONFIG]["server-round"]) >= cfg.num_server_rounds
    outputs = SiteOutputs(model, inputs, pick_device(cfg.device))
    work = work_folder(context, cfg, data.name)
    audit = load_audit(model, cfg, site_folder(context, cfg), reference_arrays(msg).get(REFERENCE_HISTOGRAM),
                       site=data.name, cache_dir=cache_folder(work),
                       device=pick_device(cfg.device)) if final and cfg.label_shift else None
    metrics = evaluate_site(model, outputs, data, cfg, prior_train=training_prior(msg), final=final,
                            work_dir=work, audit=audit)
    projection = reference_arrays(msg).get(PROJECTION)
    if projection is None:
        return reply(msg, data, None, {NUM_EXAMPLES: len(data.y_test), **metrics})
    moments = feature_moments(outputs.features("train", "test"), projection, site=data.name)
    metrics[N_FEATURES] = 0 if moments is None else moments.n
    return reply(msg, data, None, {NUM_EXAMPLES: len(data.y_test), **metrics}, moments=moments,
                 shift_dim=cfg.shift_dim)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Before round 1: the site's intensity histogram + spacing summary, or its feature moments."""
    cfg = RunConfig.from_run_config(run_config_of(msg.content[CONFIG]))
    kind = str(msg.content[CONFIG].get(QUERY_KIND, ""))
    if kind not in QUERY_KINDS:
        raise ValueError(f"Unknown query {kind!r}; this site answers {QUERY_KINDS}.")
    folder = site_folder(context, cfg)
    name = own_name(context, folder)
    if kind == "reference":
        own = site_intensity(folder, cfg, site=name, cache_dir=cache_folder(work_folder(context, cfg, name)))
        records = {INTENSITY: from_numpy({HISTOGRAM: own.counts})} if cfg.spacing_mm > 0 else {}
        return query_reply(msg, name, kind, cfg, records, own.metrics(), REFERENCE_METRICS)
    reference = reference_arrays(msg)
    arrays, n_features = pretrained_moments(cfg, folder, work_folder(context, cfg, name), reference.get(PROJECTION),
                                            reference.get(REFERENCE_HISTOGRAM), site=name)
    records = {MOMENTS: from_numpy(arrays)} if arrays else {}
    return query_reply(msg, name, kind, cfg, records, {N_FEATURES: n_features}, (N_FEATURES,))


def query_reply(msg: Message, name: str, kind: str, cfg: RunConfig, records: dict[str, ArrayRecord],
                metrics: dict[str, float], allowed: tuple[str, ...]) -> Message:
    """Wrap a query's aggregates and pass them through the egress whitelist before they may leave."""
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": name}), **records})
    check_egress(describe(content), EgressPolicy.build({}, allowed, records=aggregate_records(kind, cfg.shift_dim)),
                 site=name)
    return Message(content=content, reply_to=msg)


def training_prior(msg: Message) -> np.ndarray | None:
    """The federation's training prior π_train, sent by the coordinator with every evaluation."""
    return prior_from_record(msg.content[LABEL_SHIFT]) if LABEL_SHIFT in msg.content else None  # type: ignore[arg-type]
