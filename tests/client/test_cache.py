"""Frozen-prefix feature cache: same model as without it, and never stale."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.cache import MEMORY, Entry, FeatureCache, MemoryLayer, dihedral
from fedrad.client.features import prefix_bn_layers, site_inputs
from fedrad.client.train import fit, pixel_inputs, predict_proba
from fedrad.common.config import RunConfig
from fedrad.common.model import build_model
from tests.helpers import array_site as site

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_memory():
    MEMORY.clear()
    yield
    MEMORY.clear()


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("augment", ["dihedral", "none"])
def test_cached_and_uncached_training_give_the_same_model(tmp_path, augment):
    cfg = RunConfig(freeze_blocks=14, local_epochs=1, batch_size=4, fov_mm=16.0, augment=augment)
    data = site()
    uncached = build_model(cfg)
    fit(uncached, pixel_inputs(uncached, data.x_train, 8 if augment == "dihedral" else 1, CPU), data.y_train, cfg,
        seed=7)
    cached = build_model(cfg)
    inputs = site_inputs(cached, cfg, data, tmp_path, CPU)
    assert inputs.cache_misses == (16 if augment == "dihedral" else 12)  # one view: test images = first 4 train
    assert inputs.train.n_views == (8 if augment == "dihedral" else 1)
    fit(cached, inputs.train, data.y_train, cfg, seed=7)
    a, b = trainable(uncached), trainable(cached)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    state_a, state_b = uncached.state_dict(), cached.state_dict()
    torch.testing.assert_close(state_a["_bn1.running_var"], state_b["_bn1.running_var"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(predict_proba(uncached, pixel_inputs(uncached, data.x_test, 1, CPU)),
                               predict_proba(cached, inputs.test), rtol=1e-4, atol=1e-5)


def test_second_use_hits_the_disk_cache_in_a_fresh_process(tmp_path):
    cfg = RunConfig(freeze_blocks=14, fov_mm=16.0, augment="dihedral")
    data = site()
    first = site_inputs(build_model(cfg), cfg, data, tmp_path, CPU)
    MEMORY.clear()  # as in a new process (Deployment Engine: one process per message)
    second = site_inputs(build_model(cfg), cfg, data, tmp_path, CPU)
    assert (first.cache_hits, first.cache_misses) == (0, 16)
    assert (second.cache_hits, second.cache_misses) == (16, 0)
    idx = torch.arange(3)
    torch.testing.assert_close(first.train.batch(idx, 5), second.train.batch(idx, 5))


def test_changed_image_or_settings_are_misses(tmp_path):
    cfg = RunConfig(freeze_blocks=14, fov_mm=16.0, augment="dihedral")
    data = site()
    site_inputs(build_model(cfg), cfg, data, tmp_path, CPU)
    changed = site()
    changed.keys_train = ("edited",) + data.keys_train[1:]  # one file's content changed -> new key
    assert site_inputs(build_model(cfg), cfg, changed, tmp_path, CPU).cache_misses == 1
    for other in (cfg.replace(freeze_blocks=12), cfg.replace(spacing_mm=0.25), cfg.replace(prefix_bn="site")):
        assert site_inputs(build_model(other), other, data, tmp_path, CPU).cache_misses == 16, other
    # one view: the training images share the single-view cache, where the 4 test images already are
    one_view = cfg.replace(augment="none")
    assert site_inputs(build_model(one_view), one_view, data, tmp_path, CPU).cache_misses == 8


def test_cached_features_are_the_prefix_of_each_view(tmp_path):
    cfg = RunConfig(freeze_blocks=10, fov_mm=16.0, augment="dihedral")
    data = site(n=3)
    model = build_model(cfg)
    inputs = site_inputs(model, cfg, data, tmp_path, CPU)
    with torch.no_grad():
        expected = model.eval().forward_units(dihedral(torch.from_numpy(data.x_train), 6), 0, 11)
    torch.testing.assert_close(inputs.train.batch(torch.arange(3), 6), expected, rtol=1e-5, atol=1e-5)


def test_prefix_adabn_is_estimated_once_and_kept_with_the_features(tmp_path):
    cfg = RunConfig(freeze_blocks=14, fov_mm=16.0, prefix_bn="site")
    data = site()
    model = build_model(cfg)
    before = model._bn0.running_mean.clone()
    site_inputs(model, cfg, data, tmp_path, CPU)
    adapted = model._bn0.running_mean.clone()
    assert not torch.allclose(before, adapted)
    assert "_blocks.15._bn2" not in prefix_bn_layers(model, 15) and "_bn0" in prefix_bn_layers(model, 15)
    MEMORY.clear()
    again = build_model(cfg)
    site_inputs(again, cfg, data, tmp_path, CPU)  # from the cache: same statistics, not re-estimated
    torch.testing.assert_close(again._bn0.running_mean, adapted)


def test_memory_layer_is_bounded():
    layer = MemoryLayer(limit_bytes=1000)
    entry = lambda n: Entry([], np.zeros(n, np.uint8), {})  # noqa: E731
    layer.put(Path("a"), entry(600))
    layer.put(Path("b"), entry(600))  # evicts a
    assert layer.get(Path("a")) is None and layer.get(Path("b")) is not None
    layer.put(Path("c"), entry(5000))  # larger than the bound: not kept
    assert layer.get(Path("c")) is None


def test_cache_file_is_written_atomically_and_reloads(tmp_path):
    cache = FeatureCache(tmp_path, "k", memory_mb=0)
    out = cache.get(["a", "b"], lambda idx: np.ones((len(idx), 1, 2, 1, 1), np.float32) * np.array(idx)[:, None, None, None, None])
    assert out.shape == (2, 1, 2, 1, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["prefix-k.npz"]
    again = FeatureCache(tmp_path, "k").get(["b"], lambda idx: pytest.fail("should be cached"))
    np.testing.assert_array_equal(again, out[1:])


def test_memory_layer_counts_a_replaced_entry_once():
    layer = MemoryLayer(limit_bytes=1000)
    entry = lambda n: Entry([], np.zeros(n, np.uint8), {})  # noqa: E731
    layer.put(Path("a"), entry(400))
    layer.put(Path("a"), entry(400))  # the same file again: 400 bytes held, not 800
    layer.put(Path("b"), entry(500))
    assert layer.get(Path("a")) is not None and layer.get(Path("b")) is not None


def test_the_cache_key_changes_with_the_code_that_computes_the_prefix(monkeypatch):
    """Another torch (other kernels) or a bumped cache version is a miss, not a stale hit with other rounding."""
    from fedrad.client import cache

    key = cache.cache_key(freeze_blocks=14)
    assert cache.cache_key(freeze_blocks=14) == key
    monkeypatch.setattr(cache.torch, "__version__", "0.0.0")
    assert cache.cache_key(freeze_blocks=14) != key
    monkeypatch.undo()
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    assert cache.cache_key(freeze_blocks=14) != key
