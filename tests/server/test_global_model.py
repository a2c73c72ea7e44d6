"""The saved global model round-trips, and a site never seen in training can use it with pooled BN or AdaBN."""

import numpy as np
import pytest
import torch

from fedrad.client.dataset import SiteData
from fedrad.client.train import pixel_inputs, predict_proba
from fedrad.client.unseen import evaluate_unseen, global_model_for_site
from fedrad.common.bn import recalibrate_bn
from fedrad.common.config import RunConfig
from fedrad.common.finetune import shared_keys, site_bn_stat_keys
from fedrad.common.metrics import classification_metrics
from fedrad.common.model import build_model
from fedrad.server.bn_registry import BNRegistry
from fedrad.server.global_model import load_global_model, restore_registry, save_global_model

CFG = RunConfig(bn_mode="silobn", batch_size=4)


def site_stats(model, shift):
    state = model.state_dict()
    return {k: (state[k].numpy() + shift if k.endswith("mean") else state[k].numpy() * (1 + shift))
            for k in site_bn_stat_keys(model)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = build_model(CFG)
    registry = BNRegistry()
    registry.update("site-a", 3, site_stats(model, 0.0), 20)
    registry.update("site-b", 2, site_stats(model, 1.0), 60)
    shared = {k: v.numpy() for k, v in model.state_dict().items() if k in set(shared_keys(model, CFG.bn_mode))}
    save_global_model(out, server_round=3, shared=shared, registry=registry, config=CFG.to_run_config())
    return out, shared, registry


def test_global_model_round_trips(saved):
    out, shared, registry = saved
    glob = load_global_model(out)
    assert glob.server_round == 3 and glob.config == CFG.to_run_config()
    assert list(glob.shared) == list(shared)
    assert all(np.array_equal(glob.shared[k], v) for k, v in shared.items())
    assert glob.registry.summary() == registry.summary()
    for k, v in registry.pooled().items():
        assert np.array_equal(glob.bn_pooled[k], v)
    assert sorted(p.name for p in out.iterdir()) == ["global.json", "global.npz"]  # no temporary file left


def test_missing_global_model_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="global.npz not found"):
        load_global_model(tmp_path)


def shifted_site(n_train=8, n_test=6, shift=2.0):
    rng = np.random.default_rng(0)
    def images(n):
        return (rng.normal(0, 1, (n, 3, 48, 48)) + shift).astype(np.float32)
    return SiteData(name="new", x_train=images(n_train), y_train=np.full(n_train, -1),  # labels never read
                    x_test=images(n_test), y_test=np.array([0, 1] * (n_test // 2)),
                    x_unlabelled=np.zeros((0, 3, 48, 48), np.float32), spacings_mm=np.zeros((0, 2)))


def test_pooled_bn_loads_the_pooled_statistics(saved):
    out, _, registry = saved
    glob = load_global_model(out)
    _, model = global_model_for_site(glob.config, glob.site_weights())
    state = model.state_dict()
    for k, v in registry.pooled().items():
        assert np.array_equal(state[k].numpy(), v)


def test_adabn_reestimates_the_same_layers_from_the_sites_images_only(saved):
    out, _, _ = saved
    glob = load_global_model(out)
    site = shifted_site()
    pooled = evaluate_unseen(glob.config, glob.site_weights(), site, bn="pooled")
    adabn = evaluate_unseen(glob.config, glob.site_weights(), site, bn="adabn")
    assert set(pooled) == set(adabn) == {"auc", "balanced-accuracy", "ece", "test-loss"}
    assert pooled["test-loss"] != adabn["test-loss"]
    # AdaBN = the global model with recalibrate_bn on the site's training images (forward passes only)
    _, model = global_model_for_site(glob.config, glob.site_weights())
    frozen_before = model._blocks[0]._bn1.running_mean.clone()
    recalibrate_bn(model, torch.tensor_split(torch.from_numpy(site.x_train), 2))  # batch-size 4
    assert torch.equal(model._blocks[0]._bn1.running_mean, frozen_before)  # frozen BN untouched
    p = predict_proba(model, pixel_inputs(model, site.x_test, 1, torch.device("cpu")))
    assert classification_metrics(site.y_test, p) == adabn
    with pytest.raises(ValueError, match="bn must be 'pooled' or 'adabn'"):
        evaluate_unseen(glob.config, glob.site_weights(), site, bn="mine")


def test_a_restarted_coordinator_gets_its_bn_registry_back(saved):
    out, _, registry = saved  # saved after round 3
    again = BNRegistry()
    restore_registry(again, out, done_rounds=3)
    assert again.summary() == registry.summary()
    for k, v in registry.pooled().items():
        assert np.array_equal(again.pooled()[k], v)
    stale = BNRegistry()
    restore_registry(stale, out, done_rounds=2)  # the checkpoint is older than global.npz: not mixed in
    restore_registry(stale, out, done_rounds=0)  # a fresh run starts empty
    assert stale.sites == {}
