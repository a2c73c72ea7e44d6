"""bn-shrink: a site's BN statistics shrunk toward the pooled ones by count; the coordinator's record checked first."""

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

import fedrad.client.app as site_app
from fedrad.client.bn_shrink import pooled_statistics, shrink_site_bn
from fedrad.client.policy import PolicyRefused
from fedrad.common.bn import shrink_moments
from fedrad.common.config import RunConfig
from fedrad.common.finetune import shared_keys, site_bn_stat_keys
from fedrad.common.model import build_model
from fedrad.common.records import ARRAYS, BN_POOLED, config_record, from_array_record, from_numpy, to_array_record
from tests.helpers import tiny_site as tiny_site_in

pytestmark = pytest.mark.usefixtures("flower_task")


def test_shrunk_moments_are_those_of_the_site_images_plus_n0_images_from_the_pool():
    rng = np.random.default_rng(0)
    site = rng.normal(2.0, 0.5, size=(40, 3))
    pool_sample = rng.normal(-1.0, 1.5, size=(120, 3))  # stands in for the pooled population: n0 = 120 images of it
    mean, var = shrink_moments(site.mean(0), site.var(0), 40, pool_sample.mean(0), pool_sample.var(0), 120)
    both = np.concatenate([site, pool_sample])
    np.testing.assert_allclose(mean, both.mean(0), rtol=1e-10)
    np.testing.assert_allclose(var, both.var(0), rtol=1e-10)
    w = 40 / (40 + 120)
    np.testing.assert_allclose(mean, w * site.mean(0) + (1 - w) * pool_sample.mean(0), rtol=1e-10)
    # n0 = 0 is plain FedBN; a site far larger than n0 keeps practically its own statistics
    own = shrink_moments(site.mean(0), site.var(0), 40, pool_sample.mean(0), pool_sample.var(0), 0)
    np.testing.assert_array_equal(own[0], site.mean(0))
    np.testing.assert_array_equal(own[1], site.var(0))
    big = shrink_moments(site.mean(0), site.var(0), 10**6, pool_sample.mean(0), pool_sample.var(0), 50)
    np.testing.assert_allclose(big[0], site.mean(0), atol=1e-3 * 3)
    with pytest.raises(ValueError, match="positive image count"):
        shrink_moments(site.mean(0), site.var(0), 0, pool_sample.mean(0), pool_sample.var(0), 50)


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    return tiny_site_in(tmp_path_factory.mktemp("data"), seed=5, kernel="sharp", hu_offset=150, noise_hu=35)


def pooled_like(model, seed=1, **override):
    """A pooled record shaped like the model's own adapted BN statistics (values drawn at random)."""
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    out = {}
    for key in site_bn_stat_keys(model):
        shape = tuple(state[key].shape)
        out[key] = (rng.uniform(0.5, 2.0, shape) if key.endswith("running_var") else rng.normal(0, 1, shape)
                    ).astype(np.float32)
    out.update(override)
    return out


def train_message(cfg, pooled=None):
    model = build_model(cfg)
    content = RecordDict({ARRAYS: to_array_record(model.state_dict(), shared_keys(model, cfg.bn_mode)),
                          "config": config_record(cfg.to_run_config(), {"server-round": 2})})
    if pooled is not None:
        content[BN_POOLED] = from_numpy(pooled)
    return Message(content=content, dst_node_id=1, message_type="train")


def run_train(cfg, folder, work, pooled=None):
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(folder), "work-dir": str(work)},
                      state=RecordDict(), run_config={})
    return site_app.train(train_message(cfg, pooled), context), context


@pytest.mark.parametrize("mode", ["fedbn", "silobn"])
def test_the_site_keeps_shrunk_statistics_and_still_reports_its_own(tiny_site, tmp_path, mode):
    base = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, bn_mode=mode, out_dir=str(tmp_path))
    pooled = pooled_like(build_model(base))
    plain, plain_ctx = run_train(base, tiny_site, tmp_path / "plain")
    shrunk, shrunk_ctx = run_train(base.replace(bn_shrink=30.0), tiny_site, tmp_path / "shrunk", pooled)
    assert not plain.has_error() and not shrunk.has_error(), (plain.error if plain.has_error() else shrunk.error)
    # nothing new leaves: the same records, the same shared weights, the site's own (unshrunk) statistics
    assert set(shrunk.content.keys()) == set(plain.content.keys())
    for record in (ARRAYS, "bn-stats"):
        sent, reference = from_array_record(shrunk.content[record]), from_array_record(plain.content[record])
        assert sent.keys() == reference.keys()
        assert all(torch.equal(sent[k], reference[k]) for k in sent), record
    # what the site keeps (and evaluates, and `fedrad predict` loads) is the blend, by its own image count
    own = from_array_record(plain.content["bn-stats"])
    kept = from_array_record(shrunk_ctx.state["fedrad-local"])
    n = int(shrunk.content["metrics"]["bn-samples"])
    for key in own:
        layer, _, part = key.rpartition(".")
        if part != "running_mean":
            continue
        mean, var = shrink_moments(own[key].double().numpy(), own[f"{layer}.running_var"].double().numpy(), n,
                                   pooled[key], pooled[f"{layer}.running_var"], 30.0)
        np.testing.assert_allclose(kept[key].numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kept[f"{layer}.running_var"].numpy(), var, rtol=1e-5, atol=1e-6)
        assert not np.allclose(kept[key].numpy(), own[key].numpy())  # it did move
    plain_kept = from_array_record(plain_ctx.state["fedrad-local"])
    assert all(torch.equal(plain_kept[k], own[k]) for k in own)  # bn-shrink 0: FedBN as before


@pytest.mark.parametrize("change, match", [
    ("extra", r"extra \['_blocks.0._bn0.running_mean'\]"),
    ("missing", "missing"),
    ("shape", "other shapes"),
    ("nan", "not finite"),
    ("negative", "variance is negative"),
])
def test_a_pooled_record_unlike_the_sites_own_statistics_is_refused(change, match):
    cfg = RunConfig(fov_mm=32.0, bn_shrink=50.0)
    model = build_model(cfg)
    pooled = pooled_like(model)
    key = next(iter(pooled))
    var_key = key.replace("running_mean", "running_var")
    if change == "extra":
        pooled["_blocks.0._bn0.running_mean"] = np.zeros(32, np.float32)
    elif change == "missing":
        pooled.pop(var_key)
    elif change == "shape":
        pooled[key] = np.zeros(pooled[key].size + 1, np.float32)
    elif change == "nan":
        pooled[key][0] = np.nan
    else:
        pooled[var_key][0] = -1.0
    content = RecordDict({BN_POOLED: from_numpy(pooled)})
    with pytest.raises(PolicyRefused, match=match) as err:
        pooled_statistics(content, model, cfg, "site-d")
    assert "site-d" in str(err.value)


def test_no_pooled_statistics_apply_without_bn_shrink_a_record_or_local_statistics():
    cfg = RunConfig(fov_mm=32.0, bn_shrink=50.0)
    model = build_model(cfg)
    record = RecordDict({BN_POOLED: from_numpy(pooled_like(model))})
    assert pooled_statistics(RecordDict(), model, cfg, "s") is None  # round 1: the registry is still empty
    assert pooled_statistics(record, model, cfg.replace(bn_shrink=0.0), "s") is None
    shared = cfg.replace(bn_mode="shared")
    assert pooled_statistics(record, build_model(shared), shared, "s") is None  # statistics averaged anyway
    got = pooled_statistics(record, model, cfg, "s")
    assert got is not None and set(got) == set(site_bn_stat_keys(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert shrink_site_bn(model, got, 40, 0.0) == {} and shrink_site_bn(model, None, 40, 50.0) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_train_handler_refuses_a_bad_pooled_record_with_a_code(tiny_site, tmp_path):
    cfg = RunConfig(local_epochs=1, batch_size=8, fov_mm=32.0, out_dir=str(tmp_path), bn_shrink=50.0)
    pooled = pooled_like(build_model(cfg))
    pooled.pop(next(iter(pooled)))
    out, _ = run_train(cfg, tiny_site, tmp_path / "w", pooled)
    assert out.has_error() and out.error.reason.startswith("policy-refused incident=")
    assert "bn-pooled" in (tmp_path / "w" / "incidents.log").read_text()
