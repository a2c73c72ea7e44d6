"""compare planning and summary: the job list, compare.json's schema, mean ± sd, best marks and paired gaps."""

import json

import pytest

from fedrad.common.config import RunConfig
from fedrad.lab.compare_plan import plan_compare
from fedrad.lab.compare_report import mean_sd, summarize, to_markdown, write_compare
from fedrad.lab.synth import SiteSpec, generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root, sites=[SiteSpec(name=n, n_patients=6, prevalence=0.5, spacing_mm=0.8, noise_hu=10,
                                   kernel="smooth", hu_offset=0, manufacturer="GE") for n in ("a", "b", "c")],
             seed=0, image_size=32)
    return root


def plan(data, tmp_path, **kw):
    return plan_compare(RunConfig(data_dir=str(data)), out=tmp_path, **kw)


def test_plan_runs_every_strategy_and_site_at_every_seed(data, tmp_path):
    p = plan(data, tmp_path, seeds=2, strategies=["fedbn", "full", "local"])
    assert p.seeds == [0, 1] and p.sites == ["a", "b", "c"]
    kinds = sorted((j.kind, j.name, j.seed) for j in p.jobs)
    assert kinds == sorted([("federated", "fedbn", s) for s in (0, 1)] + [("federated", "full", s) for s in (0, 1)]
                           + [("local", "local", s) for s in (0, 1)] + [("loso", x, s) for x in "abc" for s in (0, 1)])
    assert p.jobs[0].name == "full"  # the longest jobs first
    full = next(j for j in p.jobs if j.name == "full")
    assert full.config["freeze-blocks"] == -1 and full.config["bn-mode"] == "fedbn"
    assert next(j for j in p.jobs if j.kind == "loso").config["bn-mode"] == "silobn"
    assert len({j.out_dir for j in p.jobs}) == len(p.jobs)  # every run writes its own folder


@pytest.mark.parametrize("kw, match", [(dict(strategies=["fedprox"]), "Unknown strategy"),
                                       (dict(seeds=0), "--seeds must be >= 1")])
def test_plan_refuses_bad_requests(data, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        plan(data, tmp_path, **kw)


def fake_result(kind, name, seed, aucs, wall=10.0, bytes_sent=100):
    return {"kind": kind, "name": name, "seed": seed, "wall_seconds": wall,
            "sites": [{"name": s, "n_train": n, "n_test": 5, "auc": auc, "balanced_accuracy": 0.5, "ece": 0.1,
                       "bytes_sent_per_round": bytes_sent} for (s, n), auc in zip((("a", 20), ("b", 8), ("c", 15)), aucs)]}


def fake_loso(site, seed, pooled, ada):
    metrics = lambda auc: {"auc": auc, "balanced-accuracy": 0.5, "ece": 0.1}  # noqa: E731
    return {"kind": "loso", "name": site, "seed": seed, "trained_on": [x for x in "abc" if x != site],
            "pooled_bn": metrics(pooled), "adabn": metrics(ada), "wall_seconds": 5.0}


def test_summary_follows_the_schema_with_mean_and_sd_over_seeds(data, tmp_path):
    p = plan(data, tmp_path, seeds=2, strategies=["local", "pooled", "fedbn", "silobn", "fedavg-full"])
    results = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        results += [fake_result("local", "local", seed, [0.8, 0.6 + shift, 0.7], bytes_sent=0),
                    fake_result("pooled", "pooled", seed, [0.9, 0.9, 0.9], bytes_sent=None),
                    fake_result("federated", "fedbn", seed, [0.89, 0.8 + shift, 0.95]),
                    fake_result("federated", "silobn", seed, [0.88, 0.8, 0.95]),
                    {**fake_result("federated", "fedavg-full", seed, [0.7, 0.7, 0.7]),
                     "shift_scores": {"a": 0.1, "b": 0.5, "c": 0.3}}]
        results += [fake_loso(s, seed, 0.7, 0.8 + shift) for s in "abc"]
    summary = summarize(p, results, wall_seconds=60.0)
    # the schema, exactly these keys at least
    json.dumps(summary)
    for run in summary["runs"]:
        assert {"strategy", "sites", "wall_seconds"} <= set(run)
        for site in run["sites"]:
            assert {"name", "auc", "balanced_accuracy", "ece", "bytes_sent_per_round"} <= set(site)
    for entry in summary["leave_one_out"]:
        assert {"site", "pooled_bn_auc", "adabn_auc"} <= set(entry)
    local = summary["runs"][0]
    assert local["strategy"] == "local" and local["sites"][1]["auc_seeds"] == [0.6, 0.7]
    assert local["sites"][1]["auc"] == pytest.approx(0.65) and local["sites"][1]["auc_sd"] == pytest.approx(0.0707107, abs=1e-6)
    assert summary["runs"][1]["sites"][0]["bytes_sent_per_round"] is None  # pooled: the images would move
    assert summary["leave_one_out"][0]["adabn_auc"] == pytest.approx(0.85)
    assert summary["leave_one_out"][0]["in_federation_auc"] == pytest.approx(0.88)  # silobn, site a
    assert summary["smallest_site"] == "b" and summary["most_shifted_sites"] == ["b"]
    gaps = {(g["b"], g["site"]): g for g in summary["gaps"]}
    assert gaps[("pooled", "a")]["mean"] == pytest.approx(-0.01) and gaps[("pooled", "a")]["holds"]
    assert not gaps[("pooled", "b")]["holds"]  # 0.85 vs 0.9: 0.05 below pooled
    above_local = gaps[("local", "b")]
    assert above_local["per_seed"] == [pytest.approx(0.2), pytest.approx(0.2)]
    assert above_local["holds"] and above_local["beyond_sd"]
    assert gaps[("fedavg-full", "b")]["mean"] == pytest.approx(0.15) and ("fedavg-full", "a") not in gaps
    md = to_markdown(summary)
    assert "| fedbn | 0.890 ± 0.000 |" in md  # not best in column a (pooled is)
    assert "**0.900 ± 0.000**" in md and "images move" in md
    write_compare(summary, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["runs"][0]["strategy"] == "local"
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000


def test_summary_of_series_data_whose_truth_has_no_2d_scanner_fields(tmp_path):
    """`fedrad synth --kind series` truth names slice thickness, not spacing or kernel: compare still summarises."""
    data = tmp_path / "series"
    for name in "abc":
        (data / name).mkdir(parents=True)
        (data / name / "labels.csv").write_text("image,label,split\n")
    (data / "truth.json").write_text(json.dumps({"kind": "series", "sites": [
        {"name": n, "n_patients": 6, "prevalence": 0.4, "slice_mm": 2.5, "c_index_ceiling_test": 0.8} for n in "abc"]}))
    p = plan_compare(RunConfig(data_dir=str(data)), out=tmp_path / "out", seeds=1, strategies=["fedbn"], loso=False)
    summary = summarize(p, [fake_result("federated", "fedbn", 0, [0.9, 0.8, 0.7])], wall_seconds=1.0)
    assert summary["scanners"][0] == {"name": "a", "n_patients": 6, "prevalence": 0.4, "spacing_mm": None,
                                      "noise_hu": None, "kernel": None, "hu_offset": None}
    assert "| fedbn | **0.900 ± 0.000** |" in to_markdown(summary)


def test_mean_sd_ignores_undefined_values():
    assert mean_sd([0.5, None, float("nan"), 0.7]) == (0.6, pytest.approx(0.141421, abs=1e-6))
    assert mean_sd([None]) == (None, None)
    assert mean_sd([0.3]) == (0.3, 0.0)


def test_one_seed_claims_nothing_beyond_an_sd():
    from fedrad.lab.compare_report import gaps

    def run(auc):
        return {"kind": "federated", "name": None, "seed": 0, "sites": [{"name": "c", "auc": auc}]}

    results = [{**run(0.9), "name": "fedbn"}, {**run(0.7), "name": "local"}]
    (gap,) = gaps(results, ["fedbn", "local"], ["c"], "c", [])  # fedbn above local on the smallest site
    assert gap["holds"] and gap["mean"] == pytest.approx(0.2) and not gap["beyond_sd"]
