"""The "Done when" path on a tiny version: series data from the generator, `task = survival`, end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedrad.common.config import RunConfig
from fedrad.common.survival import PairCounts, pooled_c_index
from fedrad.lab.simulate import simulate
from fedrad.lab.synth_series import default_series_sites, generate_series

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def series_data(tmp_path_factory):
    """Three tiny series sites (16 patients, no censoring: events >= 2), each with min-count 2."""
    data = tmp_path_factory.mktemp("series") / "data"
    sites = [dataclasses.replace(s, n_patients=16, size_px=48, n_slices=24, test_fraction=0.5, dropout_days=1e6,
                                 follow_up_days=1e6) for s in default_series_sites()]
    generate_series(data, sites=sites, seed=5)
    for site in sites:
        (data / site.name / "site-policy.toml").write_text("min-count = 2\n")
    return data


def test_series_survival_federation_reports_c_index_per_site_and_federated(tmp_path, series_data) -> None:
    data = series_data
    cfg = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, fov_mm=32.0, shift_dim=0, task="survival",
                    data_dir=str(data), out_dir=str(tmp_path / "out"))
    report = simulate(cfg, num_cpus=2)
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"] == "survival" and report["failed_replies"] == [] and report["rejected_updates"] == []
    counts = []
    for site in report["sites"]:
        assert site["n_train"] == 8 and site["rounds_trained"] == 2
        assert 0.0 <= site["c_index"] <= 1.0 and site["auc"] is None
        assert site["c_index_ceiling"] is not None  # from truth.json, beside the estimate
        pairs = site["pairs"]
        assert PairCounts(**pairs).c_index == pytest.approx(site["c_index"])
        counts.append(PairCounts(**pairs))
        # the survival head is 1 x 1280 + 1 values smaller than the classifier's: bytes measured as for it
        assert report["shared_payload_bytes"] <= site["bytes_sent_per_round"] <= 1.05 * report["shared_payload_bytes"]
        work = tmp_path / "out" / "sites" / site["name"]
        assert (work / "km-risk-groups.png").is_file()  # the KM plot stays at the site
        egress = (work / "egress.jsonl").read_text()
        assert "c-index" in egress and "km" not in egress.replace("keys", "")
    assert report["c_index_federated"] == pytest.approx(pooled_c_index(counts))
    assert "Federated C-index" in (tmp_path / "out" / "report.md").read_text()


def test_mask_covariates_train_beside_the_cnn_are_averaged_and_their_values_stay_at_the_site(tmp_path,
                                                                                          series_data) -> None:
    import numpy as np

    cfg = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, fov_mm=32.0, shift_dim=0, task="survival",
                    covariates="log-volume,asphericity,hu-sd", data_dir=str(series_data), out_dir=str(tmp_path / "out"))
    report = simulate(cfg, num_cpus=2)
    assert report["failed_replies"] == [] and report["rejected_updates"] == []
    assert all(0.0 <= site["c_index"] <= 1.0 for site in report["sites"])
    with np.load(tmp_path / "out" / "state" / "checkpoint.npz") as f:
        beta = f["arrays/_covariates.weight"]
    assert beta.shape == (1, 3) and np.abs(beta).min() > 0  # trained from 0 at the sites, averaged by the coordinator
    for site in report["sites"]:
        egress = (tmp_path / "out" / "sites" / site["name"] / "egress.jsonl").read_text()
        assert "_covariates.weight" in egress  # the coefficients travel, as the head does
        assert "log-volume" not in egress and "hu-sd" not in egress  # the covariate values do not
    # the site scores its test split again with fedrad evaluate: the run's own C-index and td-AUC come back
    from fedrad.cli import main

    site = report["sites"][0]
    out = tmp_path / "evaluate"
    assert main(["evaluate", "--model", str(tmp_path / "out"), "--site-work", str(tmp_path / "out" / "sites" /
                 site["name"]), "--data", str(series_data / site["name"]), "--split", "test", "--out", str(out)]) == 0
    result = json.loads((out / "evaluate.json").read_text())
    assert result["c_index"] == pytest.approx(site["c_index"], abs=1e-12)
    assert (result["td_auc"] is None) == (site["td_auc"] is None)
    assert (out / "km-risk-groups.png").is_file() and "risk_group" in (out / "predictions.csv").read_text()
