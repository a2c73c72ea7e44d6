"""Poisoned updates from real site daemons never reach the global model."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from fedrad.common.config import RunConfig
from fedrad.common.finetune import shared_keys
from fedrad.common.model import build_model
from fedrad.server.aggregate import update_distance
from fedrad.server.checkpoint import checkpoint_path, load_checkpoint
from tests.deploy.conftest import SITES
from tests.deploy.harness import PROJECT, wait_for

pytestmark = pytest.mark.slow
RUN = "local-epochs=1 batch-size=8 fov-mm=32.0 min-sites=1 round-timeout=600.0"


def poisoning_app(folder):
    """A copy of this Flower app whose ClientApp is tests/deploy/poison_app.py."""
    for package in ("server", "client", "common"):
        shutil.copytree(PROJECT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "tests" / "deploy").mkdir(parents=True)
    for name in ("tests/__init__.py", "tests/deploy/__init__.py", "tests/deploy/poison_app.py"):
        shutil.copy(PROJECT / name, folder / name)
    pyproject = (PROJECT / "pyproject.toml").read_text()
    changed = pyproject.replace('clientapp = "fedrad.client.app:app"', 'clientapp = "tests.deploy.poison_app:app"')
    assert changed != pyproject
    (folder / "pyproject.toml").write_text(changed)
    return folder


def test_nan_and_scaled_updates_are_rejected_by_name(deployment, tmp_path):
    deployment.start_coordinator()
    deployment.register(*SITES)
    deployment.start_site("a")
    deployment.start_site("b", node_config="test-poison='nan'")
    deployment.start_site("c", node_config="test-poison='scale'")
    deployment.wait_online(3)
    out = tmp_path / "out"
    deployment.submit(out, RUN, rounds=1, app=poisoning_app(tmp_path / "app"))
    wait_for("the report", lambda: (out / "report.json").is_file(),
             watch=[deployment.coordinator, *deployment.sites.values()])

    report = json.loads((out / "report.json").read_text())
    rejected = {e["site"]: e["reason"] for e in report["rejected_updates"]}
    assert set(rejected) == {"b", "c"}
    assert "NaN or Inf" in rejected["b"]
    assert "norm-outlier-factor" in rejected["c"]
    ckpt = load_checkpoint(checkpoint_path(out))
    assert set(ckpt.sites) == {"a", "b", "c"} and ckpt.sites["a"].train and not ckpt.sites["c"].train
    # The global model moved by exactly a's step (the yardstick c was measured against), not by c's.
    cfg = RunConfig.from_run_config(ckpt.run_config)
    model = build_model(cfg)
    initial = {k: v.numpy() for k, v in model.state_dict().items() if k in shared_keys(model, cfg.bn_mode)}
    a_step = float(re.search(r"median ([0-9.e+-]+)", rejected["c"]).group(1))
    assert update_distance(ckpt.arrays, initial) == pytest.approx(a_step, rel=5e-3)
