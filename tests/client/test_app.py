"""The real ClientApp handlers on a tiny real site: what leaves the site, and what stays."""

import json
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

import fedrad.client.app as site_app
from fedrad.common.config import RunConfig
from fedrad.common.finetune import shared_keys, site_bn_stat_keys
from fedrad.common.model import build_model
from fedrad.common.packing import LAYOUT, PACKED, WIRE, pack_content, unpack_content
from fedrad.common.records import ARRAYS, config_record, to_array_record
from tests.helpers import tiny_site as tiny_site_in

pytestmark = pytest.mark.usefixtures("flower_task")


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    return tiny_site_in(tmp_path_factory.mktemp("data"), seed=1)


def message(cfg: RunConfig, kind: str) -> Message:
    model = build_model(cfg)
    arrays = to_array_record(model.state_dict(), shared_keys(model, cfg.bn_mode))
    config = config_record(cfg.to_run_config(), {"server-round": 1})
    return Message(content=RecordDict({ARRAYS: arrays, "config": config}), dst_node_id=1, message_type=kind)


def test_train_reply_holds_only_shared_weights_and_scalars(tiny_site, tmp_path):
    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, out_dir=str(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(tiny_site), "work-dir": str(tmp_path / "w")},
                      state=RecordDict(), run_config={})
    msg = message(cfg, "train")
    out = site_app.train(msg, context)
    content = out.content
    assert set(content.keys()) == {"arrays", "metrics", "site", "bn-stats"}
    sent = {k: tuple(a.shape) for k, a in content["arrays"].items()}
    assert sent == {k: tuple(a.shape) for k, a in msg.content["arrays"].items()}
    # BN statistics: running mean/var of the trained BN layers, one value per channel, with their image count
    bn_sent = {k: tuple(a.shape) for k, a in content["bn-stats"].items()}
    assert list(bn_sent) == site_bn_stat_keys(build_model(cfg))
    assert all(len(shape) == 1 and k.endswith(("running_mean", "running_var")) for k, shape in bn_sent.items())
    assert content["metrics"]["bn-samples"] == content["metrics"]["n-train"]
    n_images = 16
    for shape in [*sent.values(), *bn_sent.values()]:  # no pixel or per-image array: nothing shaped by the image count or size
        assert n_images not in shape[:1] and cfg.image_size not in shape
    for value in content["metrics"].values():
        assert isinstance(value, (int, float))
    assert content["site"]["name"] == "tiny"
    # The site kept its own BN in its node state, and its summary (with file names) on its own disk.
    assert "fedrad-local" in context.state
    kept = context.state["fedrad-local"]
    assert any(k.endswith("running_mean") for k in kept.keys())
    assert not set(kept.keys()) & set(sent)
    assert (tmp_path / "w" / "site-summary.json").is_file()
    # Training changed the shared head.
    before = msg.content["arrays"]["_fc.weight"].numpy()
    assert not np.array_equal(before, content["arrays"]["_fc.weight"].numpy())


def test_evaluate_reply_is_scalar_aggregates(tiny_site, tmp_path):
    cfg = RunConfig(fov_mm=32.0, out_dir=str(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(tiny_site)}, state=RecordDict(),
                      run_config={})
    out = site_app.evaluate_(message(cfg, "evaluate"), context)
    assert set(out.content.keys()) == {"metrics", "site"}
    assert set(out.content["metrics"].keys()) == {"num-examples", "auc", "balanced-accuracy", "ece", "test-loss"}


def test_a_site_without_data_says_how_to_fix_it_in_its_own_log_and_only_a_code_leaves(tmp_path, caplog):
    cfg = RunConfig(out_dir=str(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    out = site_app.train(message(cfg, "train"), context)
    assert out.has_error() and out.error.code == 100
    assert re.fullmatch(r"site-data incident=[0-9a-f]{12}", out.error.reason)
    incident = out.error.reason.split("=")[1]
    assert f"incident {incident}" in caplog.text and "--node-config" in caplog.text  # the text stays at the site


def test_last_round_evaluation_reports_label_shift_aggregates_only(tiny_site, tmp_path):
    cfg = RunConfig(num_server_rounds=1, fov_mm=32.0, out_dir=str(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(tiny_site), "work-dir": str(tmp_path / "w")},
                      state=RecordDict(), run_config={})
    msg = message(cfg, "evaluate")
    msg.content["label-shift"] = ConfigRecord({"prior-train-0": 0.6, "prior-train-1": 0.4})
    out = site_app.evaluate_(msg, context)  # passed the egress whitelist
    metrics = out.content["metrics"]
    assert {"ece-uncorrected", "ece-corrected", "brier-uncorrected", "brier-corrected",
            "label-shift-flags"} <= set(metrics.keys())
    assert all(np.isfinite(v) for k, v in metrics.items() if k != "auc")
    # 16 patients: too few labelled test images to calibrate -> no correction, said so in the site's own record
    assert metrics["ece-corrected"] == metrics["ece-uncorrected"]
    record = (tmp_path / "w" / "label-shift.json").read_text()
    assert "site tiny: too few labelled test images to calibrate" in record


def test_train_reply_reports_class_counts(tiny_site, tmp_path):
    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, out_dir=str(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(tiny_site), "work-dir": str(tmp_path / "w")},
                      state=RecordDict(), run_config={})
    metrics = site_app.train(message(cfg, "train"), context).content["metrics"]
    assert metrics["n-class-0"] + metrics["n-class-1"] == metrics["n-train"] and metrics["n-class-1"] > 0


@pytest.mark.parametrize("handler, kind", [(site_app.train, "train"), (site_app.evaluate_, "evaluate"),
                                           (site_app.query, "query")])
@pytest.mark.parametrize("theirs", ["0.0.9", None])
def test_a_coordinator_on_another_fedrad_version_is_refused_naming_both(tiny_site, tmp_path, handler, kind, theirs):
    from fedrad.common.version import VersionMismatch, __version__

    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, out_dir=str(tmp_path))
    msg = message(cfg, kind)
    if theirs is None:
        del msg.content["config"]["fedrad-version"]
    else:
        msg.content["config"]["fedrad-version"] = theirs
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(tiny_site), "work-dir": str(tmp_path / "w")},
                      state=RecordDict(), run_config={})
    out = handler(msg, context)
    assert out.has_error() and out.error.reason.startswith("version-mismatch incident=")
    assert out.error.code == 102 and "fedrad" not in out.error.reason  # a code, never the text
    incidents = (tmp_path / "w" / "incidents.log").read_text()
    assert re.search(f"{VersionMismatch.__name__}: the coordinator runs fedrad {theirs or '.none sent'}.* this site "
                     f"runs fedrad {re.escape(__version__)}", incidents)
    # refused before it read anything: only the incident and the refusal's line in the egress log
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["egress.jsonl", "incidents.log"]
    (line,) = (tmp_path / "w" / "egress.jsonl").read_text().splitlines()
    assert json.loads(line)["refused"]["code"] == "version-mismatch"


def test_arrays_arrive_packed_reach_the_handler_as_records_and_leave_packed(tmp_path):
    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, out_dir=str(tmp_path))
    msg = message(cfg, "train")
    sent = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
    msg.content = pack_content(msg.content)  # as the coordinator sends it
    seen = {}

    def handler(m, context):
        seen.update({k: v.numpy() for k, v in m.content[ARRAYS].items()})
        return Message(RecordDict({ARRAYS: m.content[ARRAYS]}), reply_to=m)

    reply = site_app.on_the_wire(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                              run_config={}), handler)
    assert list(seen) == list(sent) and all(seen[k].tobytes() == sent[k].tobytes() for k in sent)
    assert list(reply.content) == [WIRE]  # the reply leaves as one buffer
    assert list(unpack_content(reply.content)[ARRAYS]) == list(sent)


def test_a_packed_message_that_lies_about_its_bytes_is_refused_with_a_code(tiny_site, tmp_path):
    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, out_dir=str(tmp_path))
    msg = message(cfg, "train")
    msg.content = RecordDict({WIRE: ArrayRecord({PACKED: Array(np.zeros(0, np.uint8)), LAYOUT: Array(
        np.frombuffer(b'[["a","arrays",[["w","<f4",[1]]]],["config","config",{}]]', np.uint8))})})
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(tiny_site), "work-dir": str(tmp_path / "w")},
                      state=RecordDict(), run_config={})
    called = []
    out = site_app.on_the_wire(msg, context, lambda m, c: called.append(m))
    assert not called and out.has_error() and out.error.reason.startswith("internal incident=")
    assert "record 'a': the layout describes more than the buffer's 0 bytes" in \
        (tmp_path / "w" / "incidents.log").read_text()
