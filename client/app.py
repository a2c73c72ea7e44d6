"""fedrad ClientApp: one hospital site. Wiring only: read the message, call `client/` and `common/`.

Per message the site (1) reads its own DICOM folder, (2) builds the pretrained model and
loads the coordinator's shared weights plus its own BatchNorm (from the node's state, or
from its own disk after a restart: `fedrad.client.local_state`), (3) trains or evaluates, (4)
keeps its BN in both places, and (5) replies with the shared weights and
scalar aggregates only, after the egress whitelist has checked the reply.

Before round 1 the coordinator may query the site (`query`): for its HU histogram and
spacing summary (the federated intensity reference), then for its feature moments on raw
and harmonised inputs (the shift score). Aggregates only, whitelisted like every reply.

The site decides what leaves (`fedrad.client.policy`): the run must be inside its policy,
the whitelist comes from the policy and the site's own model (never from the message),
every aggregate of fewer than `min-count` images is withheld with a code, every reply is
written to the site's egress log (`fedrad.client.egress_log`), and any failure becomes a
coded reply with no text (`fedrad.client.refusals`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedrad.client import egress_log
from fedrad.client.bn_shrink import pooled_statistics, shrink_site_bn
from fedrad.client.cache import cache_folder
from fedrad.client.dataset import SiteData, SiteDataError
from fedrad.client.deploy_eval import load_audit
from fedrad.client.dp_noise import clip_and_noise
from fedrad.client.features import SiteInputs, site_inputs
from fedrad.client.local_state import LocalStateStore
from fedrad.client.moments import feature_moments, pretrained_moments
from fedrad.client.outputs import SiteOutputs
from fedrad.client.policy import PolicyRefused, SitePolicy, SmallCount, site_policy
from fedrad.client.reference import load_inputs, site_intensity
from fedrad.client.refusals import guarded, refusal
from fedrad.client.site_shift import evaluate_site
from fedrad.client.survival_site import evaluate_survival, fit_survival, site_covariates
from fedrad.client.train import fit, pick_device
from fedrad.common.codes import CODES, reason
from fedrad.common.config import RunConfig
from fedrad.common.dp import epsilon
from fedrad.common.efficientnet_lite import NUM_FEATURES, EfficientNetLite0
from fedrad.common.egress import EgressPolicy, aggregate_records, check_egress
from fedrad.common.feature_shift import Moments
from fedrad.common.feature_shift import projection as own_projection
from fedrad.common.finetune import local_keys, shared_keys, site_bn_stat_keys
from fedrad.common.labelshift import logit_adjustment
from fedrad.common.model import build_model
from fedrad.common.packing import PackingError, pack_content, unpack_content
from fedrad.common.piggyback import combine, evaluate_round
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
    LABEL_SHIFT_METRICS,
    METRICS,
    MOMENTS,
    N_FEATURES,
    NOT_RUN_CONFIG,
    NUM_EXAMPLES,
    PROJECTION,
    QUERY_KIND,
    QUERY_KINDS,
    REFERENCE,
    REFERENCE_HISTOGRAM,
    REFERENCE_METRICS,
    RELIABILITY_METRICS,
    SITE,
    TRAIN_METRICS,
    WITHHELD,
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


def on_the_wire(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: messages arrive packed and leave packed (`fedrad.common.packing`); handlers see plain records.

    The reply is packed after the handler returned it, so the whitelist and the egress log
    saw (and logged) the records themselves. A message whose packed layout does not describe
    its bytes is refused like any other failure: a code goes out, the text stays here.
    """
    try:
        msg.content = unpack_content(msg.content)
    except PackingError as err:  # the run config is in the packed part: the work folder is known in deployment only
        work = Path(str(context.node_config["work-dir"])) if "work-dir" in context.node_config else None
        code, incident = refusal(err, work)
        return Message(Error(CODES[code], reason(code, incident)), reply_to=msg)
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content = pack_content(reply.content)
    return reply


app = ClientApp(mods=[on_the_wire])


def site_folder(context: Context, cfg: RunConfig) -> Path:
    """Deployment: node-config `data-dir` is the site's folder. Simulation: partition i of `data-dir`."""
    if "data-dir" in context.node_config:
        return Path(str(context.node_config["data-dir"]))
    if "partition-id" not in context.node_config or not cfg.data_dir:
        raise SiteDataError("This site has no data: start the SuperNode with --node-config \"data-dir='/path/to/site'\".")
    sites = discover_sites(Path(cfg.data_dir))
    pid = int(context.node_config["partition-id"])
    if pid >= len(sites):
        raise SiteDataError(f"partition-id {pid} but {cfg.data_dir} holds only {len(sites)} site folders.")
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


def site_setup(msg: Message, context: Context) -> tuple[RunConfig, Path, str, Path, SitePolicy]:
    """The run config (same fedrad version), the site's folder, name, work folder and policy; refuses a run
    outside the policy."""
    cfg = RunConfig.from_run_config(run_config_of(msg.content[CONFIG]))
    folder = site_folder(context, cfg)
    name = own_name(context, folder)
    policy = site_policy(dict(context.node_config), folder)
    policy.check(cfg)
    return cfg, folder, name, work_folder(context, cfg, name), policy


def where(msg: Message, context: Context):  # noqa: ANN201 - (work folder, egress-log writer), for `guarded`
    """Where a refusal is written: the site's work folder and egress log, as far as the message lets us know."""
    record = msg.content[CONFIG]
    cfg = RunConfig.from_run_config({k: v for k, v in record.items() if k not in NOT_RUN_CONFIG})
    folder = site_folder(context, cfg)
    work = work_folder(context, cfg, own_name(context, folder))
    policy = site_policy(dict(context.node_config), folder)

    def note(refused: dict) -> None:
        egress_log.append(work, run=context.run_id, server_round=_round(msg), kind=msg.metadata.message_type,
                          policy_sha256=policy.sha256(), refused=refused)

    return work, note


def _round(msg: Message) -> int | None:
    value = msg.content[CONFIG].get("server-round") if CONFIG in msg.content else None
    return int(value) if isinstance(value, (int, float)) else None


def own_shared_shapes(model: EfficientNetLite0, cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes this site shares under the run's bn-mode, from its own model."""
    state = model.state_dict()
    return {k: tuple(state[k].shape) for k in shared_keys(model, cfg.bn_mode)}


def prepare(msg: Message, context: Context
            ) -> tuple[RunConfig, SiteData, EfficientNetLite0, SiteInputs, SitePolicy, Path]:
    """Config from the message, the site's data, the model with shared + local weights, its inputs, policy, work."""
    cfg, folder, name, work, policy = site_setup(msg, context)
    data = load_inputs(cfg, folder, reference_arrays(msg).get(REFERENCE_HISTOGRAM), site=name,
                       cache_dir=cache_folder(work))
    data.name = name
    device = pick_device(cfg.device)
    model = build_model(cfg, device)
    inputs = site_inputs(model, cfg, data, work, device)
    sent = {k: tuple(a.shape) for k, a in msg.content[ARRAYS].items()}
    if sent != own_shared_shapes(model, cfg):  # the coordinator may set only what this site shares
        raise PolicyRefused(f"site {data.name}: the coordinator's arrays differ from what this site shares under "
                            f"bn-mode {cfg.bn_mode}, freeze-blocks {cfg.freeze_blocks}: extra "
                            f"{sorted(set(sent) - set(own_shared_shapes(model, cfg)))[:5]}, missing "
                            f"{sorted(set(own_shared_shapes(model, cfg)) - set(sent))[:5]}, or other shapes")
    state = from_array_record(msg.content[ARRAYS])
    local = load_local_state(msg, context, cfg, data.name)
    if local is not None:
        state.update(local)
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"site {data.name}: the coordinator sent weights this model does not have: {unexpected[:5]}; "
                         "coordinator and site must run the same fedrad version and config.")
    return cfg, data, model, inputs, policy, work


def reply_content(data: SiteData, policy: SitePolicy, own_shapes: dict[str, tuple[int, ...]],
                  arrays: ArrayRecord | None, metrics: dict[str, float], bn_stats: ArrayRecord | None = None,
                  bn_shapes: dict[str, tuple[int, ...]] | None = None, moments: Moments | None = None,
                  shift_dim: int = 0, withheld: dict[str, str] | None = None) -> RecordDict:
    """A train reply's (`arrays` given) or an evaluate reply's content, passed through the site's own whitelist.

    `own_shapes` and `bn_shapes` come from the site's own model, never from the message;
    `moments` go in the `moments` record, whitelisted by `shift_dim`; `withheld` names the
    aggregates the site chose not to send, with their codes.
    """
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": data.name})})
    if withheld:
        content[WITHHELD] = ConfigRecord(dict(withheld))
    allowed = TRAIN_METRICS
    if arrays is not None:
        content[ARRAYS] = arrays
    else:
        allowed = (*EVAL_METRICS, N_FEATURES)  # n-features: 0 when the site withholds its moments
    if bn_stats is not None:
        content[BN_STATS] = bn_stats
    records = {}
    if moments is not None:
        content[MOMENTS] = from_numpy(dict(zip(moment_keys(), (moments.mean, moments.cov))))
        records = aggregate_records("evaluate", shift_dim)
    check_egress(describe(content), EgressPolicy.build(own_shapes if arrays is not None else {}, allowed, bn_shapes,
                                                       records=records), site=data.name)
    return content


def send(msg: Message, context: Context, policy: SitePolicy, work: Path, content: RecordDict) -> Message:
    """The reply as it leaves: written to the site's egress log, then wrapped for Flower."""
    egress_log.append(work, run=context.run_id, server_round=_round(msg), kind=msg.metadata.message_type,
                      policy_sha256=policy.sha256(), content=content)
    return Message(content=content, reply_to=msg)


def write_summary(context: Context, cfg: RunConfig, data: SiteData, extra: dict[str, float]) -> None:
    """The site's own record of what it read and skipped (file names stay here, only counts travel)."""
    folder = work_folder(context, cfg, data.name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "site-summary.json").write_text(json.dumps({**data.summary(), **extra}, indent=2))
    for skipped in data.skipped:
        log.warning("site %s skipped %s: %s", data.name, skipped.file, skipped.reason)


@app.train()
@guarded("train", where)
def train(msg: Message, context: Context) -> Message:
    """Train on the site's images; with `evaluate-first` (rounds >= 2), evaluate the incoming model first.

    The evaluation rides in the same message (`fedrad.common.piggyback`): one round trip per
    round. A site that evaluated but may not train still sends its evaluation, with the
    refusal's code in place of the train records.
    """
    prepared = prepare(msg, context)
    policy, work = prepared[4], prepared[5]
    first = evaluate_round(msg.content)
    if first is None:
        return send(msg, context, policy, work, train_content(msg, context, *prepared))
    evaluation = evaluate_content(msg, context, *prepared, server_round=first)
    try:
        content = combine(train_content(msg, context, *prepared), evaluation)
    except Exception as err:  # noqa: BLE001 - as `guarded`: a code goes out, the text stays in incidents.log
        content = combine(None, evaluation, refusal(err, work))
    return send(msg, context, policy, work, content)


def train_content(msg: Message, context: Context, cfg: RunConfig, data: SiteData, model: EfficientNetLite0,
                  inputs: SiteInputs, policy: SitePolicy, work: Path) -> RecordDict:
    """Train the prepared model for this round; the train reply's content (checked against the whitelist)."""
    server_round = int(msg.content[CONFIG]["server-round"])
    if len(data.y_train) < policy.min_count:
        raise SmallCount(f"site {data.name}: {len(data.y_train)} labelled training images, fewer than the "
                         f"policy's min-count {policy.min_count}: no update is sent")
    pooled_bn = pooled_statistics(msg.content, model, cfg, data.name)  # bn-shrink: checked before any work
    own_shapes = own_shared_shapes(model, cfg)  # once: it walks the whole model (was 1.3 s a message, per key)
    received = {k: v.clone() for k, v in model.state_dict().items() if k in own_shapes}
    counts = np.bincount(data.y_train, minlength=len(CLASS_COUNTS))  # the site's prior, and its share of π_train
    if cfg.task == "survival":  # Cox head on (time, event); y_train holds the events, no class counts travel
        counts = None
        stats = fit_survival(model, inputs.train, data.time_train, data.y_train, cfg,
                             seed=cfg.seed * 10_000 + server_round, device=pick_device(cfg.device),
                             covariates=site_covariates(data, cfg)[0])
    else:
        stats = fit(model, inputs.train, data.y_train, cfg, seed=cfg.seed * 10_000 + server_round,
                    device=pick_device(cfg.device),
                    logit_offset=logit_adjustment(counts, cfg.logit_adjust) if cfg.logit_adjust else None)
    own_bn = shrink_site_bn(model, pooled_bn, len(data.y_train), cfg.bn_shrink)  # the registry gets these, unshrunk
    state = model.state_dict()
    context.state[LOCAL_STATE] = to_array_record(state, local_keys(model, cfg.bn_mode))
    local_store(msg, context, cfg, data.name).save(server_round, {k: state[k] for k in local_keys(model, cfg.bn_mode)})
    shared = to_array_record(state, list(received))
    private: dict[str, float] = {}
    if cfg.dp_clip > 0:  # site-level differential privacy on the update of the shared tensors
        noisy, norm = clip_and_noise(state, received, clip=cfg.dp_clip, noise=cfg.dp_noise)
        shared = to_array_record(noisy, list(received))
        private = {"dp-update-norm": norm, "dp-epsilon": epsilon(cfg.dp_noise, server_round, cfg.dp_delta)}
        log.info("site %s: round %d update norm %.3g clipped to %.3g, noise multiplier %.3g", data.name, server_round,
                 norm, cfg.dp_clip, cfg.dp_noise)
    write_summary(context, cfg, data, {"round": server_round, **stats, "cache-hits": inputs.cache_hits,
                                       "cache-misses": inputs.cache_misses, **private})  # stays at the site
    metrics = {NUM_EXAMPLES: len(data.y_train), "n-train": len(data.y_train), "n-test": len(data.y_test),
               "n-skipped": len(data.skipped), BN_SAMPLES: len(data.y_train), **stats}
    withheld = {}
    if counts is None:
        pass
    elif all(c == 0 or c >= policy.min_count for c in counts):  # a class cell of 1..min-count-1 images is not sent
        metrics.update(zip(CLASS_COUNTS, map(int, counts)))
    else:
        withheld["class-counts"] = "small-count"
    bn_keys = site_bn_stat_keys(model)  # the BN layers fit() re-estimated on this site's training images
    bn_stats = to_array_record({**state, **own_bn}, bn_keys) if bn_keys and policy.send_bn_stats else None
    if bn_keys and not policy.send_bn_stats:
        withheld["bn-stats"] = "policy-refused"
        metrics.pop(BN_SAMPLES)
    return reply_content(data, policy, own_shapes, shared, metrics, bn_stats,
                         {k: tuple(state[k].shape) for k in bn_keys} if bn_stats is not None else None,
                         withheld=withheld)


@app.evaluate()
@guarded("evaluate", where)
def evaluate_(msg: Message, context: Context) -> Message:
    prepared = prepare(msg, context)
    content = evaluate_content(msg, context, *prepared, server_round=int(msg.content[CONFIG]["server-round"]))
    return send(msg, context, prepared[4], prepared[5], content)


def evaluate_content(msg: Message, context: Context, cfg: RunConfig, data: SiteData, model: EfficientNetLite0,
                     inputs: SiteInputs, policy: SitePolicy, work: Path, *, server_round: int) -> RecordDict:
    """Evaluate the prepared model as round `server_round`; the evaluate reply's content (whitelisted).

    The last round's evaluation adds calibration, label shift and the deployment audit.
    """
    final = server_round >= cfg.num_server_rounds
    outputs = SiteOutputs(model, inputs, pick_device(cfg.device))
    if cfg.task == "survival":  # C-index, pair counts, td-AUC, IBS; risk scores and KM plot stay in `work`
        metrics, withheld = evaluate_survival(outputs, data.time_train, data.y_train, data.time_test, data.y_test,
                                              min_count=policy.min_count, work_dir=work, site=data.name,
                                              covariates=site_covariates(data, cfg))
    else:
        audit = load_audit(model, cfg, site_folder(context, cfg), reference_arrays(msg).get(REFERENCE_HISTOGRAM),
                           site=data.name, cache_dir=cache_folder(work),
                           device=pick_device(cfg.device)) if final and cfg.label_shift else None
        metrics = evaluate_site(model, outputs, data, cfg, prior_train=training_prior(msg), final=final,
                                work_dir=work, audit=audit)
        metrics, withheld = suppress_small_counts(metrics, data, policy)
    projection = reference_arrays(msg).get(PROJECTION)
    own = (data, policy, {})
    if projection is None:
        return reply_content(*own, None, {NUM_EXAMPLES: len(data.y_test), **metrics}, withheld=withheld)
    refused = moments_refusal(projection, cfg, policy)
    moments = None
    if refused:
        withheld["moments"] = refused
    else:
        moments = feature_moments(outputs.features("train", "test"), projection, site=data.name,
                                  min_count=policy.moments_min_count(cfg.shift_dim))
        if moments is None:
            withheld["moments"] = "small-count"
    metrics[N_FEATURES] = 0 if moments is None else moments.n
    return reply_content(*own, None, {NUM_EXAMPLES: len(data.y_test), **metrics}, moments=moments,
                         shift_dim=cfg.shift_dim, withheld=withheld)


TEST_METRICS = ("auc", "balanced-accuracy", "ece", "test-loss")
LABELLED_PRIOR_KEYS = ("prior-labelled", "prior-site", "prior-deploy-labelled")  # prior-site is the labelled one
# whenever EM gives none


def suppress_small_counts(metrics: dict[str, float], data: SiteData, policy: SitePolicy
                          ) -> tuple[dict[str, float], dict[str, str]]:
    """The evaluation metrics this site may send, and what it withholds and why.

    Test metrics need `min-count` test images; label-shift scalars also need the policy's
    consent, and those estimated on the unlabelled pool (EM, BBSE) need `min-count` of them;
    priors read off the labelled class counts are not sent where a class holds 1 to
    min-count − 1 images (the train reply withholds those counts).
    """
    out, withheld = dict(metrics), {}
    shift_keys = [k for k in out if k in LABEL_SHIFT_METRICS or k in RELIABILITY_METRICS]
    if len(data.y_test) < policy.min_count:
        for key in [*TEST_METRICS, *shift_keys]:
            out.pop(key, None)
        withheld["test-metrics"] = "small-count"
        if shift_keys:
            withheld["label-shift"] = "small-count"
    elif shift_keys and not policy.send_label_shift:
        for key in shift_keys:
            out.pop(key)
        withheld["label-shift"] = "policy-refused"
    elif shift_keys and len(data.x_unlabelled) < policy.min_count:
        for key in ("prior-em", "prior-bbse"):
            out.pop(key, None)
    # The labelled prior is the class counts divided by n-train: where the counts are a small cell (withheld
    # from the train reply), every prior read off them is withheld too.
    counts = np.bincount(data.y_train[data.y_train >= 0], minlength=len(CLASS_COUNTS))
    if any(0 < c < policy.min_count for c in counts):
        for key in LABELLED_PRIOR_KEYS:
            out.pop(key, None)
    for key in [k for k in out if k in RELIABILITY_METRICS and k.endswith("-n")]:
        if out[key] < policy.min_count:  # a reliability bin of fewer images is not sent at all
            for part in ("n", "conf", "pos"):
                out.pop(key[:-1] + part, None)
    return out, withheld


def moments_refusal(projection: np.ndarray, cfg: RunConfig, policy: SitePolicy) -> str | None:
    """Why this site sends no feature moments for this projection (None: it may).

    The site checks the projection it is given: moments must be allowed, the dimension within
    its maximum, and the matrix exactly the orthonormal projection the run config's seed draws
    (so a coordinator cannot aim it at chosen directions of the feature space).
    """
    if not policy.send_moments or cfg.shift_dim > policy.max_shift_dim:
        return "policy-refused"
    expected = own_projection(NUM_FEATURES, cfg.shift_dim, seed=cfg.seed)
    if projection.shape != expected.shape or not np.allclose(projection, expected, atol=1e-6):
        return "policy-refused"
    return None


@app.query()
@guarded("query", where)
def query(msg: Message, context: Context) -> Message:
    """Before round 1: the site's intensity histogram + spacing summary, or its feature moments."""
    cfg, folder, name, work, policy = site_setup(msg, context)
    kind = str(msg.content[CONFIG].get(QUERY_KIND, ""))
    if kind not in QUERY_KINDS:
        raise PolicyRefused(f"Unknown query {kind!r}; this site answers {QUERY_KINDS}.")
    site = (context, name, kind, cfg, policy, work)
    if kind == "reference":
        if not policy.send_histogram:
            return query_reply(msg, *site, {}, {}, (), {"histogram": "policy-refused"})
        own = site_intensity(folder, cfg, site=name, cache_dir=cache_folder(work))
        if (own.n_images if cfg.spacing_mm > 0 else own.n_spacings) < policy.min_count:
            return query_reply(msg, *site, {}, {}, (), {"histogram": "small-count"})
        records = {INTENSITY: from_numpy({HISTOGRAM: own.counts})} if cfg.spacing_mm > 0 else {}
        return query_reply(msg, *site, records, own.metrics(), REFERENCE_METRICS)
    reference = reference_arrays(msg)
    projection = reference.get(PROJECTION)
    refused = "policy-refused" if projection is None else moments_refusal(projection, cfg, policy)
    if refused:
        return query_reply(msg, *site, {}, {N_FEATURES: 0}, (N_FEATURES,), {"moments": refused})
    arrays, n_features = pretrained_moments(cfg, folder, work, projection, reference.get(REFERENCE_HISTOGRAM),
                                            site=name, min_count=policy.moments_min_count(cfg.shift_dim))
    records = {MOMENTS: from_numpy(arrays)} if arrays else {}
    return query_reply(msg, *site, records, {N_FEATURES: n_features}, (N_FEATURES,),
                       {} if arrays else {"moments": "small-count"})


def query_reply(msg: Message, context: Context, name: str, kind: str, cfg: RunConfig, policy: SitePolicy,
                work: Path, records: dict[str, ArrayRecord], metrics: dict[str, float], allowed: tuple[str, ...],
                withheld: dict[str, str] | None = None) -> Message:
    """Wrap a query's aggregates, pass them through the site's whitelist, and log them."""
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": name}), **records})
    if withheld:
        content[WITHHELD] = ConfigRecord(dict(withheld))
    check_egress(describe(content), EgressPolicy.build({}, allowed, records=aggregate_records(kind, cfg.shift_dim)),
                 site=name)
    egress_log.append(work, run=context.run_id, server_round=None, kind=f"query:{kind}",
                      policy_sha256=policy.sha256(), content=content)
    return Message(content=content, reply_to=msg)


def training_prior(msg: Message) -> np.ndarray | None:
    """The federation's training prior π_train, sent by the coordinator with every evaluation."""
    return prior_from_record(msg.content[LABEL_SHIFT]) if LABEL_SHIFT in msg.content else None  # type: ignore[arg-type]
