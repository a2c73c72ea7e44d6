"""At the site: fedbn keeps every BN tensor whatever the coordinator sends; silobn keeps only the statistics."""

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

import fedrad.client.app as site_app
from fedrad.common.config import RunConfig
from fedrad.common.finetune import shared_keys
from fedrad.common.model import build_model
from fedrad.common.records import ARRAYS, config_record, from_array_record, from_numpy, to_array_record, to_numpy
from tests.helpers import tiny_site as tiny_site_in

pytestmark = pytest.mark.usefixtures("flower_task")


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    return tiny_site_in(tmp_path_factory.mktemp("data"), seed=3, kernel="sharp", hu_offset=40, manufacturer="GE")


def message(cfg, arrays, server_round):
    config = config_record(cfg.to_run_config(), {"server-round": server_round})
    return Message(content=RecordDict({ARRAYS: arrays, "config": config}), dst_node_id=1, message_type="train")


def first_round(cfg, folder, tmp_path):
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(folder), "work-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})
    model = build_model(cfg)
    out = site_app.train(message(cfg, to_array_record(model.state_dict(), shared_keys(model, cfg.bn_mode)), 1),
                         context)
    # what the coordinator sends next: some other average, here the reply moved by +0.5 everywhere
    global_next = {k: v + 0.5 for k, v in to_numpy(out.content[ARRAYS]).items()}
    _, _, model, *_ = site_app.prepare(message(cfg, from_numpy(global_next), 2), context)
    return context, global_next, model.state_dict(), out


@pytest.mark.parametrize("mode", ["fedbn", "silobn"])
def test_the_site_keeps_its_own_bn_and_takes_the_rest_from_the_coordinator(tiny_site, tmp_path, mode):
    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, bn_mode=mode, out_dir=str(tmp_path))
    context, global_next, state, out = first_round(cfg, tiny_site, tmp_path)
    kept = from_array_record(context.state["fedrad-local"])
    assert kept and all(torch.equal(state[k], v) for k, v in kept.items())  # the site's BN, bit for bit
    for k, v in global_next.items():  # everything shared is the coordinator's
        assert np.array_equal(state[k].numpy(), v), k
    stat_parts = ("running_mean", "running_var", "num_batches_tracked")
    if mode == "fedbn":
        assert any(k.endswith(".weight") for k in kept) and not any("_bn" in k for k in global_next)
    else:  # silobn: statistics local, affine from the coordinator
        assert all(k.endswith(stat_parts) for k in kept)
        assert "_blocks.15._bn2.weight" in global_next and "_blocks.15._bn2.running_var" not in global_next
    # what the site reported to the registry is exactly the statistics it keeps
    for k, v in from_array_record(out.content["bn-stats"]).items():
        assert torch.equal(kept[k], v)
