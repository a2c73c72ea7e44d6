"""lr-max chosen on a validation split carved from training rows: the copy, the choice, and its use in compare."""

import csv
import json
import math

import pytest

import fedrad.lab.compare as compare_mod
from fedrad.client.deploy_eval import AUDIT_FILE
from fedrad.common.config import RunConfig
from fedrad.lab.compare_plan import BY_NAME, plan_compare
from fedrad.lab.compare_report import summarize, to_markdown
from fedrad.lab.lr_tuning import carve_validation, choose_lr, parse_grid
from fedrad.lab.synth import SiteSpec, generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root, sites=[SiteSpec(name="a", n_patients=40, prevalence=0.3, spacing_mm=0.8, noise_hu=10,
                                   kernel="smooth", hu_offset=0, manufacturer="GE", test_fraction=0.25, n_deploy=4,
                                   n_deploy_eval=5, deploy_prevalence=0.6),
                          SiteSpec(name="b", n_patients=12, prevalence=0.5, spacing_mm=0.8, noise_hu=10,
                                   kernel="smooth", hu_offset=0, manufacturer="GE")], seed=0, image_size=32)
    return root


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_validation_copy_never_holds_a_test_row_and_splits_training_by_class(data, tmp_path):
    out = carve_validation(data, tmp_path / "tune", seed=0)
    original, carved = rows(data / "a" / "labels.csv"), rows(out / "a" / "labels.csv")
    test_images = {r["image"] for r in original if r["split"] == "test"}
    assert test_images and not test_images & {r["image"] for r in carved}  # the test split took no part
    train = [r for r in original if r["split"] == "train" and r["label"]]
    assert {r["image"] for r in carved if r["label"]} == {r["image"] for r in train}
    assert sum(not r["label"] for r in carved) == sum(not r["label"] for r in original) == 4  # unlabelled stay
    for c in ("0", "1"):
        n_c = sum(r["label"] == c for r in train)
        n_val = sum(r["label"] == c and r["split"] == "test" for r in carved)
        assert n_val == max(round(0.25 * n_c), 2)
    assert not (out / "a" / AUDIT_FILE).exists() and (out / "a" / "images").is_symlink()
    assert all((out / "a" / r["image"]).is_file() for r in carved)
    again = carve_validation(data, tmp_path / "again", seed=0)  # stable: the same rows again
    assert rows(again / "a" / "labels.csv") == carved
    other = rows(carve_validation(data, tmp_path / "other", seed=1) / "a" / "labels.csv")
    assert [r["split"] for r in other] != [r["split"] for r in carved]


def test_choose_lr_takes_the_best_and_the_smaller_rate_on_a_tie():
    assert choose_lr({3e-4: 0.80, 1e-3: 0.85, 3e-3: 0.85, 1e-2: math.nan}) == 1e-3
    with pytest.raises(ValueError, match="no tuning run"):
        choose_lr({1e-3: math.nan})
    assert parse_grid("3e-4, 1e-3") == (3e-4, 1e-3)
    for bad in ("", "a,b", "1e-3,-1"):
        with pytest.raises(ValueError, match="--lr-grid"):
            parse_grid(bad)


def test_full_baselines_train_every_layer_at_one_rate_and_the_recipe_keeps_its_row():
    assert BY_NAME["full"].changes["lr_decay"] == BY_NAME["fedavg-full"].changes["lr_decay"] == 1.0
    assert BY_NAME["full-discriminative"].changes == {"freeze_blocks": -1, "bn_mode": "fedbn", "lr_decay": 0.5}


def fake_run(job):
    """A result whose AUC peaks at 1e-3 for fedbn and at 1e-2 for local (validation runs only see the copy)."""
    cfg = RunConfig.from_run_config(job.config)
    best = {"fedbn": 1e-3, "local": 1e-2, "silobn": 3e-4}[job.name if job.kind != "loso" else "silobn"]
    auc = 0.9 - abs(math.log10(cfg.lr_max / best)) * 0.1
    if job.kind == "loso":
        m = {"auc": auc, "balanced-accuracy": 0.5, "ece": 0.1}
        return {"kind": "loso", "name": job.name, "seed": job.seed, "lr_chosen": cfg.lr_max,
                "trained_on": ["a", "b"], "pooled_bn": m, "adabn": m, "wall_seconds": 1.0}
    return {"kind": job.kind, "name": job.name, "seed": job.seed, "lr_chosen": cfg.lr_max, "wall_seconds": 1.0,
            "data_dir": cfg.data_dir,
            "sites": [{"name": s, "n_train": 5, "n_test": 5, "auc": auc, "balanced_accuracy": 0.5, "ece": 0.1,
                       "bytes_sent_per_round": 1} for s in ("a", "b")]}


def test_compare_tunes_first_on_the_copy_then_runs_every_seed_at_the_chosen_rate(data, tmp_path, monkeypatch):
    monkeypatch.setattr(compare_mod, "run_job", fake_run)
    monkeypatch.setattr(compare_mod, "quiet_flower", lambda: None)
    plan = plan_compare(RunConfig(data_dir=str(data), lr_max=3e-3), out=tmp_path / "cmp", seeds=2,
                        strategies=["fedbn", "local"], loso=False, lr_grid=(1e-4, 1e-3, 1e-2))
    assert len(plan.tuning) == 2 * 3 and all(j.tuning and j.seed == 0 for j in plan.tuning)
    assert all(j.config["data-dir"] == str(plan.tuning_data) and not j.config["label-shift"] for j in plan.tuning)
    order = []
    results = compare_mod.execute(plan, on_done=lambda job, result: order.append(job.tuning))
    assert order == [True] * 6 + [False] * 4  # every tuning run before any real one
    assert all(r["data_dir"] == str(data) for r in results)  # the real runs read the real data
    assert {(r["name"], r["lr_chosen"]) for r in results} == {("fedbn", 1e-3), ("local", 1e-2)}
    summary = summarize(plan, results, wall_seconds=1.0)
    assert {r["strategy"]: r["lr_chosen"] for r in summary["runs"]} == {"fedbn": 1e-3, "local": 1e-2}
    assert summary["lr_tuning"]["fedbn"]["validation_auc"] == [0.8, 0.9, 0.8]
    json.dumps(summary, allow_nan=False)
    text = to_markdown(summary)
    assert "## lr-max chosen on a validation split" in text and "| fedbn | 0.800 | 0.900 | 0.800 | 0.001 |" in text


def test_without_a_grid_nothing_is_tuned(data, tmp_path, monkeypatch):
    monkeypatch.setattr(compare_mod, "run_job", fake_run)
    monkeypatch.setattr(compare_mod, "quiet_flower", lambda: None)
    plan = plan_compare(RunConfig(data_dir=str(data), lr_max=3e-3), out=tmp_path, seeds=1, strategies=["fedbn"],
                        loso=False)
    results = compare_mod.execute(plan)
    assert not plan.tuning and [r["lr_chosen"] for r in results] == [3e-3]
    assert "not tuned" in to_markdown(summarize(plan, results, wall_seconds=1.0))


def test_rates_from_an_earlier_compare_are_reused_by_name(tmp_path):
    import json

    from fedrad.lab.lr_tuning import rates_from

    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"lr_tuning": {"fedbn": {"grid": [0.001, 0.003], "validation_auc": [0.8, 0.9],
                                                         "lr_chosen": 0.003}, "local": {"lr_chosen": 0.01}}}))
    assert rates_from(path, ["fedbn"]) == {"fedbn": 0.003}
    with pytest.raises(ValueError, match=r"no tuned lr-max for \['pooled'\]"):
        rates_from(path, ["fedbn", "pooled"])
    again = tmp_path / "again.json"  # a compare run with --lr-from passes its rates on
    again.write_text(json.dumps({"lr_tuning": {"lr_from": {"fedbn": 0.003}}}))
    assert rates_from(again, ["fedbn"]) == {"fedbn": 0.003}
    (tmp_path / "untuned.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="lr_tuning"):
        rates_from(tmp_path / "untuned.json", ["fedbn"])
