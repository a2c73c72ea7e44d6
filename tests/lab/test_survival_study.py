"""`fedrad survival`: federated vs site alone vs ceiling per site and seed; the site-alone Cox baseline itself."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import fedrad.lab.centralised as centralised
import fedrad.lab.simulate as simulate_module
import fedrad.lab.survival_study as study_module
from fedrad.common.config import RunConfig


def _data(tmp_path):
    data = tmp_path / "data"
    for name in ("site-a", "site-b"):
        (data / name).mkdir(parents=True)
        (data / name / "labels.csv").write_text("image,label,split\n")
    (data / "truth.json").write_text(json.dumps({"sites": [{"name": "site-a", "c_index_ceiling_test": 0.80},
                                                           {"name": "site-b", "c_index_ceiling_test": 0.85}]}))
    return data


def test_the_study_judges_each_site_against_ceiling_and_site_alone_and_resumes(tmp_path, monkeypatch):
    data, calls = _data(tmp_path), []
    # site-a: 0.78/0.79 federated, within 0.03 of 0.80 and above alone (0.70); site-b: 0.80 in seed 1, 0.05 short
    fed = {0: {"site-a": 0.78, "site-b": 0.84}, 1: {"site-a": 0.79, "site-b": 0.80}}
    alone = {0: {"site-a": 0.70, "site-b": 0.86}, 1: {"site-a": 0.70, "site-b": 0.75}}

    def fake_simulate(cfg, num_cpus=None):
        calls.append(("federated", cfg.seed, cfg.task))
        report = {"config": cfg.to_run_config(), "c_index_federated": 0.8 + 0.01 * cfg.seed, "simulate_wall_seconds": 9,
                  "sites": [{"name": n, "n_test": 64, "n_events_test": 40, "c_index": c, "bytes_sent_per_round": 123}
                            for n, c in fed[cfg.seed].items()]}
        (tmp_path / "out" / f"seed-{cfg.seed}-federated").mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / f"seed-{cfg.seed}-federated" / "report.json").write_text(json.dumps(report))
        return report

    def fake_local(sites, cfg, work):
        calls.append(("local", cfg.seed, cfg.task))
        return {"sites": [{"name": n, "c_index": c} for n, c in alone[cfg.seed].items()], "wall_seconds": 3}

    monkeypatch.setattr(simulate_module, "simulate", fake_simulate)
    monkeypatch.setattr(centralised, "run_local", fake_local)
    monkeypatch.setattr("fedrad.client.reference.load_inputs", lambda cfg, folder, ref, cache_dir=None: folder.name)
    cfg = RunConfig(data_dir=str(data), num_server_rounds=3)
    study = study_module.run_survival_study(cfg, tmp_path / "out", seeds=[0, 1], progress=lambda msg: None)
    assert calls == [("federated", 0, "survival"), ("local", 0, "survival"),
                     ("federated", 1, "survival"), ("local", 1, "survival")]
    a, b = study["sites"]
    assert (a["within_ceiling"], a["above_local"]) == (True, True)
    assert (b["within_ceiling"], b["above_local"]) == (False, False)  # 0.85 - 0.80 > 0.03; 0.84 < 0.86 in seed 0
    assert a["federated_mean"] == pytest.approx(0.785) and b["local_sd"] == pytest.approx(np.std([0.86, 0.75], ddof=1))
    assert study["holds"] is False and study["c_index_federated_mean"] == pytest.approx(0.805)
    text = (tmp_path / "out" / "survival.md").read_text()
    assert "| site-a | 64 (40) | 0.800 | 0.785 ± 0.007 | 0.780, 0.790 | 0.700 ± 0.000 |" in text
    assert "| yes | yes | 123 |" in text and "| **no** | **no** |" in text and "without the CNN" not in text
    with_baseline = study_module.to_markdown({**study, "covariates_only": {
        "covariates": ["log-volume"], "sites": {"site-a": {"alone": 0.61, "pooled": 0.625}}}})
    assert "| site-a | 0.800 | 0.785 | 0.610 | 0.625 |" in with_baseline
    assert "| site-b | 0.850 | 0.820 | – | – |" in with_baseline

    calls.clear()  # resume: both seeds' runs are kept with their configs, nothing runs again
    again = study_module.run_survival_study(cfg, tmp_path / "out", seeds=[0, 1], resume=True, progress=lambda m: None)
    assert calls == [] and again["sites"] == study["sites"]
    # another config (more rounds) is not the kept run: it runs again
    study_module.run_survival_study(cfg.replace(num_server_rounds=4), tmp_path / "out", seeds=[0], resume=True,
                                    progress=lambda msg: None)
    assert calls == [("federated", 0, "survival"), ("local", 0, "survival")]


@pytest.mark.slow  # a tiny series site, decoded and trained: ~25 s on 2 busy cores
def test_site_alone_survival_trains_the_cox_head_and_scores_the_test_split(tmp_path):
    from fedrad.client.reference import load_inputs
    from fedrad.lab.synth_series import default_series_sites, generate_series

    sites = [dataclasses.replace(s, n_patients=12, size_px=48, n_slices=24, test_fraction=0.5, dropout_days=1e6,
                                 follow_up_days=1e6) for s in default_series_sites()[:1]]  # no censoring
    generate_series(tmp_path / "data", sites=sites, seed=5)
    cfg = RunConfig(num_server_rounds=1, local_epochs=1, batch_size=8, fov_mm=32.0, task="survival", label_shift=False)
    data = load_inputs(cfg, tmp_path / "data" / sites[0].name, None)
    result = centralised.run_local([data], cfg, tmp_path / "work")
    (row,) = result["sites"]
    assert row["name"] == sites[0].name and row["n_train"] == 6 and row["n_test"] == 6
    assert row["n_events_test"] == 6 and row["bytes_sent_per_round"] == 0
    assert 0.0 <= row["c_index"] <= 1.0 and set(row) >= {"td_auc", "integrated_brier"}
    assert centralised.build_model(cfg)._fc.out_features == 1  # the Cox head, not the classifier's two outputs
    assert centralised.run_local([data], cfg, tmp_path / "work")["sites"] == [row]  # seeded: the same figures again


def test_the_covariates_only_baseline_fits_a_cox_model_per_site_and_pooled(tmp_path, monkeypatch):
    """Real scikit-survival fits on arrays: z ranks the times at site-a; at site-b its sign is reversed."""
    from tests.helpers import array_site

    rng = np.random.default_rng(0)

    def site(name: str, sign: float):
        data = dataclasses.replace(array_site(n=40, size=8), name=name)
        z = rng.normal(size=(40, 1))
        time = np.exp(-sign * z[:, 0] + rng.normal(0, 0.3, 40)) * 500
        z_all = np.concatenate([z, np.full((40, 2), np.nan)], axis=1)  # log-volume given, the rest absent
        return dataclasses.replace(data, y_train=np.ones(30, np.int64), y_test=np.ones(10, np.int64),
                                   time_train=time[:30], time_test=time[30:], covariates_train=z_all[:30],
                                   covariates_test=z_all[30:])

    a, b = site("site-a", 1.0), site("site-b", -1.0)
    cfg = RunConfig(task="survival", covariates="log-volume")
    out = centralised.run_covariate_cox([a, b], cfg)
    assert out["covariates"] == ["log-volume"]
    assert out["sites"]["site-a"]["alone"] > 0.8 and out["sites"]["site-b"]["alone"] > 0.8  # each learns its sign
    assert out["sites"]["site-a"]["coefficients_alone"][0] > 0 > out["sites"]["site-b"]["coefficients_alone"][0]
    # one pooled coefficient cannot have both signs: one site's ranking is reversed
    assert min(out["sites"]["site-a"]["pooled"], out["sites"]["site-b"]["pooled"]) < 0.5
    with pytest.raises(ValueError, match="needs run config covariates"):
        centralised.run_covariate_cox([a], RunConfig(task="survival"))
    with pytest.raises(ValueError, match="covariates log-volume need a series row"):
        centralised.run_covariate_cox([dataclasses.replace(a, covariates_train=np.full((30, 3), np.nan))], cfg)
