"""`fedrad dp`: the study runs the baseline and each noise per seed and tabulates mean ± sd AUC with epsilon."""

import json

import pytest

import fedrad.lab.dp_study as dp_study
from fedrad.common.config import RunConfig
from fedrad.common.dp import epsilon


def test_the_study_runs_every_setting_per_seed_and_writes_the_table(tmp_path, monkeypatch):
    calls = []

    def fake_simulate(cfg, num_cpus=None):
        calls.append((cfg.seed, cfg.dp_clip, cfg.dp_noise))
        auc = 0.9 - (0.1 * cfg.dp_noise if cfg.dp_clip > 0 else 0.0) + 0.01 * cfg.seed
        return {"sites": [{"name": "a", "auc": auc}, {"name": "b", "auc": auc - 0.05}]}

    monkeypatch.setattr(dp_study, "simulate", fake_simulate)
    (tmp_path / "sites" / "a").mkdir(parents=True)
    (tmp_path / "sites" / "a" / "site-summary.json").write_text(json.dumps({"dp-update-norm": 3.5}))
    study = dp_study.run_dp_study(RunConfig(num_server_rounds=4), tmp_path, noises=[0.0, 1.0], seeds=[0, 1],
                                  clip=2.0, progress=lambda msg: None)
    assert calls == [(0, 0.0, 1.0), (0, 2.0, 0.0), (0, 2.0, 1.0), (1, 0.0, 1.0), (1, 2.0, 0.0), (1, 2.0, 1.0)]
    rows = {row["noise"]: row for row in study["rows"]}
    assert rows[None]["auc"]["a"]["mean"] == pytest.approx(0.905) and rows[None]["epsilon"] is None
    assert rows[1.0]["auc"]["b"]["mean"] == pytest.approx(0.755) and rows[1.0]["auc"]["b"]["sd"] > 0
    assert rows[1.0]["epsilon"] == pytest.approx(epsilon(1.0, 4, 1e-5)) and rows[0.0]["epsilon"] is None
    assert study["norms"] == {"a": 3.5}
    text = (tmp_path / "dp.md").read_text()
    assert "| no DP | – | 0.905 ± 0.007 |" in text and "∞ (clip only)" in text
    assert json.loads((tmp_path / "dp.json").read_text())["clip"] == 2.0
    with pytest.raises(ValueError, match="--clip must be > 0"):
        dp_study.run_dp_study(RunConfig(), tmp_path, noises=[1.0], seeds=[0], clip=0.0)
