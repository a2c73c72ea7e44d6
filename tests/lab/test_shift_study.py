"""`fedrad shift`: off/on runs side by side, the summary table, and the whole path through Flower."""

import json

import pytest

from fedrad.common.config import RunConfig
from fedrad.lab.shift_study import run_shift_study, summarise, to_markdown
from fedrad.lab.synth import SiteSpec, generate
from tests.helpers import small_site_policy


def fake_report(auc_b, pre_b, final_b):
    site = lambda name, auc, pre, final: {"name": name, "auc": auc}  # noqa: E731
    return {"sites": [site("a", 0.9, None, None), {"name": "b", "auc": auc_b}],
            "harmonization": {"sites": [
                {"name": "a", "spacing_mm": {"median": 0.7}, "intensity": {"p5_hu": -900, "p50_hu": -850,
                                                                           "p95_hu": 30},
                 "shift_raw": 1.0, "shift_harmonized": 0.8, "shift_rounds": {"1": 0.3, "2": 0.2}},
                {"name": "b", "spacing_mm": {"median": 1.0}, "intensity": {"p5_hu": -800, "p50_hu": -700,
                                                                           "p95_hu": 180},
                 "shift_raw": pre_b[0], "shift_harmonized": pre_b[1], "shift_rounds": {"1": 9.0, "2": final_b}}]}}


def test_summary_averages_over_seeds_and_names_the_most_shifted_site():
    runs = [{"seed": 0, "harmonize": "off", "report": fake_report(0.80, (5.0, None), 0.6)},
            {"seed": 0, "harmonize": "median", "report": fake_report(0.90, (5.0, 2.0), 0.4)},
            {"seed": 1, "harmonize": "off", "report": fake_report(0.70, (7.0, None), 0.8)},
            {"seed": 1, "harmonize": "median", "report": fake_report(0.70, (7.0, 3.0), 0.2)}]
    study = summarise(runs, "median")
    b = next(s for s in study["sites"] if s["name"] == "b")
    assert b["pre_off"] == pytest.approx(6.0) and b["pre_on"] == pytest.approx(2.5)
    assert b["final_off"] == pytest.approx(0.7) and b["final_on"] == pytest.approx(0.3)  # the last round's
    assert b["auc_off"] == pytest.approx(0.75) and b["auc_on"] == pytest.approx(0.80)
    assert study["most_shifted"] == {"site": "b", "shift_falls": True, "auc_not_worse": True}
    text = to_markdown(study)
    assert "| b | 1.00 | -800 / -700 / 180 | 6.000 → 2.500 | 0.700 → 0.300 | 0.750 → 0.800 |" in text
    assert "Most shifted site (pretrained shift score, raw inputs): **b**" in text


@pytest.mark.slow
def test_off_and_on_runs_through_the_simulation_engine(tmp_path):
    data = tmp_path / "data"
    sites = [SiteSpec(name=n, n_patients=20, prevalence=0.5, spacing_mm=s, noise_hu=10, kernel=k, hu_offset=o,
                      manufacturer="GE") for n, s, k, o in [("h0", 0.7, "smooth", 0), ("h1", 0.9, "sharp", 150)]]
    generate(data, sites=sites, seed=2, image_size=96)
    small_site_policy(data)
    cfg = RunConfig(num_server_rounds=1, local_epochs=1, batch_size=8, fov_mm=32.0, data_dir=str(data), shift_dim=8)
    study = run_shift_study(cfg, tmp_path / "out", seeds=[0], method="median", num_cpus=2, progress=lambda m: None)
    assert json.loads((tmp_path / "out" / "shift.json").read_text()) == study
    assert [s["name"] for s in study["sites"]] == ["h0", "h1"]
    for s in study["sites"]:
        assert s["pre_off"] > 0 and s["pre_on"] > 0 and 0 <= s["auc_off"] <= 1 and 0 <= s["auc_on"] <= 1
        assert s["spacing_mm"]["median"] in (0.7, 0.9)
    h1 = next(s for s in study["sites"] if s["name"] == "h1")
    assert h1["intensity"]["p50_hu"] > -850 + 100  # its raw field of view is 150 HU too bright
    assert study["most_shifted"]["shift_falls"]  # median standardisation removes most of a pure offset
    on = json.loads((tmp_path / "out" / "seed-0-median" / "report.json").read_text())
    assert on["harmonization"]["method"] == "median" and on["harmonization"]["reference"]["pixels"] > 0
    assert (tmp_path / "out" / "seed-0-median" / "reference.npz").is_file()
    assert "## Intensity harmonisation and shift" in (tmp_path / "out" / "seed-0-median" / "report.md").read_text()
    assert not on["failed_replies"] and not on["rejected_updates"]
