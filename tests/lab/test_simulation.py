"""End to end in Flower's Simulation Engine: 2 rounds on tiny sites produce a valid report."""

import json

import pytest

from fedrad.common.config import RunConfig
from fedrad.lab.simulate import simulate
from fedrad.lab.synth import SiteSpec, generate
from tests.helpers import small_site_policy

pytestmark = pytest.mark.slow


def tiny_sites():
    return [SiteSpec(name=f"h{i}", n_patients=20, prevalence=0.5, spacing_mm=s, noise_hu=10, kernel=k, hu_offset=o,
                     manufacturer="GE") for i, (s, k, o) in enumerate([(0.7, "smooth", 0), (0.9, "sharp", 30)])]


def test_two_round_simulation_writes_a_valid_report(tmp_path):
    data = tmp_path / "data"
    generate(data, sites=tiny_sites(), seed=2, image_size=96)
    small_site_policy(data)
    cfg = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, fov_mm=32.0, data_dir=str(data),
                    out_dir=str(tmp_path / "out"))
    report = simulate(cfg, num_cpus=2)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk == report
    assert report["rounds"] == 2 and report["strategy"].startswith("fedbn")
    assert {s["name"] for s in report["sites"]} == {"h0", "h1"}
    for site in report["sites"]:
        assert site["n_train"] + site["n_test"] == 20 and site["n_train"] >= 8 and site["n_test"] >= 6
        assert site["rounds_trained"] == 2 and len(site["history"]) == 2
        assert 0.0 <= site["auc"] <= 1.0 and 0.0 <= site["ece"] <= 1.0
        # measured bytes: the shared payload plus a little protobuf framing, far below the full model
        assert report["shared_payload_bytes"] <= site["bytes_sent_per_round"] <= 1.05 * report["shared_payload_bytes"]
    assert report["full_model_bytes"] > 2 * report["shared_payload_bytes"]
    assert report["rejected_updates"] == [] and report["failed_replies"] == []
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| h0 |" in md and "| h1 |" in md and "| h2 |" not in md
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000
    # each site kept its own summary on its own disk
    assert (tmp_path / "out" / "sites" / "h0" / "site-summary.json").is_file()
    # label shift, last round: the figures are there; 6-7 test images are too few to calibrate, and the
    # report says so by site name while the posteriors stay uncorrected
    assert 0.0 < report["prior_train"] < 1.0
    for site in report["sites"]:
        assert site["prior_true"] == 0.5 and site["ece_corrected"] == site["ece_uncorrected"]
        assert site["label_shift_warnings"] and site["label_shift_warnings"][0].startswith(f"site {site['name']}: ")
        assert site["auc_personalised"] is None or 0.0 <= site["auc_personalised"] <= 1.0
    assert (tmp_path / "out" / "sites" / "h0" / "label-shift.json").is_file()
    assert "## Label shift and concept shift" in (tmp_path / "out" / "report.md").read_text()
