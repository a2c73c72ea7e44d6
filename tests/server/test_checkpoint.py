"""Checkpoints: exact round trip, atomic replacement, and refusal to resume another experiment."""

import math

import numpy as np
import pytest

from fedrad.common.config import RunConfig
from fedrad.common.records import from_numpy
from fedrad.server.aggregate import spec_of
from fedrad.server.checkpoint import Checkpoint, Checkpointer, checkpoint_path, load_checkpoint, save_checkpoint
from fedrad.server.strategy import FedRad, SiteLog

ARRAYS = {"_fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "_fc.bias": np.array([0.5, -1], np.float32)}


def sample(round_=2, run_config=None):
    site = SiteLog("a", train={1: {"num-examples": 10.0, "train-loss": 0.7}},
                   evaluate={1: {"auc": math.nan, "num-examples": 5.0}}, bytes_sent={1: 1234})
    return Checkpoint(round=round_, fingerprint="f", federation_id="fed1",
                      run_config=run_config or RunConfig().to_run_config(), arrays=ARRAYS, sites={"a": site},
                      rejected=[(1, "b", "site b: 'x' contains NaN or Inf.")], failed=[(1, "c", "no reply")],
                      wall_seconds=12.5, round_seconds={1: 4.5, 2: 3.25})


def test_round_trip_is_exact(tmp_path):
    path = checkpoint_path(tmp_path)
    save_checkpoint(path, sample())
    back = load_checkpoint(path)
    assert back.round == 2 and back.federation_id == "fed1" and back.wall_seconds == 12.5
    assert back.round_seconds == {1: 4.5, 2: 3.25}
    for key, value in ARRAYS.items():
        np.testing.assert_array_equal(back.arrays[key], value)
        assert back.arrays[key].dtype == value.dtype
    assert back.sites["a"].train == {1: {"num-examples": 10.0, "train-loss": 0.7}}
    assert math.isnan(back.sites["a"].evaluate[1]["auc"]) and back.sites["a"].bytes_sent == {1: 1234}
    assert back.rejected == [(1, "b", "site b: 'x' contains NaN or Inf.")]  # text with 'NaN' kept as is
    assert back.failed == [(1, "c", "no reply")]
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.npz"]  # no temporary file left


def test_a_torn_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path)
    save_checkpoint(path, sample(round_=1))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fedrad.server.checkpoint.os.replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, sample(round_=2))
    assert load_checkpoint(path).round == 1


def test_resume_restores_the_strategy_and_refuses_another_experiment(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    path = checkpoint_path(tmp_path)
    first = Checkpointer(path, cfg.to_run_config())
    assert first.done == 0 and first.found is None
    strategy = FedRad(expected=spec_of(ARRAYS))
    strategy.sites = sample().sites
    first.save(3, from_numpy(ARRAYS), strategy)

    # more rounds and another timeout are the same experiment ...
    again = Checkpointer(path, cfg.replace(num_server_rounds=9, round_timeout=5.0).to_run_config())
    fresh = FedRad(expected=spec_of(ARRAYS))
    arrays = again.restore(fresh, from_numpy({k: np.zeros_like(v) for k, v in ARRAYS.items()}))
    assert again.done == 3 and again.federation_id == first.federation_id and set(again.round_seconds) == {3}
    assert fresh.sites["a"].bytes_sent == {1: 1234}
    np.testing.assert_array_equal(arrays["_fc.weight"].numpy(), ARRAYS["_fc.weight"])
    # ... another learning rate is not
    with pytest.raises(ValueError, match=r"another experiment \(run config differs in \['lr-max'\]\)"):
        Checkpointer(path, cfg.replace(lr_max=0.1).to_run_config())


def test_a_corrupt_checkpoint_names_the_file(tmp_path):
    path = checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="checkpoint.npz cannot be read"):
        load_checkpoint(path)
