"""End to end: after a (tiny) federation a site predicts, evaluates, exports and explains with its own model."""

import csv
import json
import shutil

import numpy as np
import pytest

from fedrad.cli import build_parser, main
from fedrad.common.config import RunConfig
from fedrad.lab.simulate import simulate
from fedrad.lab.synth import SiteSpec, generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("site-use")
    data = root / "data"
    sites = [SiteSpec(name=f"h{i}", n_patients=48, prevalence=0.5, spacing_mm=s, noise_hu=10, kernel=k, hu_offset=o,
                      manufacturer="GE", test_fraction=0.5) for i, (s, k, o) in
             enumerate([(0.7, "smooth", 0), (0.9, "sharp", 30), (0.8, "smooth", 10)])]
    generate(data, sites=sites, seed=3, image_size=96)
    cfg = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, fov_mm=32.0, shift_dim=0,
                    data_dir=str(data), out_dir=str(root / "run"))
    report = simulate(cfg, num_cpus=2)
    return root, data, root / "run", report


def _evaluate(tmp, *args):
    assert main(["evaluate", *args, "--split", "test", "--out", str(tmp)]) == 0
    return json.loads((tmp / "evaluate.json").read_text())


def test_predict_and_evaluate_give_the_runs_own_auc_also_from_onnx(run, tmp_path):
    root, data, out, report = run
    for site in report["sites"]:
        name = site["name"]
        result = _evaluate(tmp_path / name, "--model", str(out), "--site-work", str(out / "sites" / name),
                           "--data", str(data / name))
        assert abs(result["auc"] - site["auc"]) <= 1e-6, (name, result["auc"], site["auc"])
        low, high = result["auc_ci95"]
        assert low <= result["auc"] <= high and 0 <= low < high <= 1
        assert result["n_images"] == site["n_test"]
        cm = result["confusion_matrix"]
        assert sum(cm.values()) == site["n_test"] and (tmp_path / name / "reliability.png").stat().st_size > 1000
    name = report["sites"][0]["name"]
    export = tmp_path / "export"
    assert main(["export", "--model", str(out), "--site-work", str(out / "sites" / name), "--data",
                 str(data / name), "--format", "onnx", "--out", str(export)]) == 0
    card = json.loads((export / "model-card.json").read_text())
    assert card["exported"]["format"] == "onnx" and card["run_id"] == json.loads((out / "global.json").read_text())["run_id"]
    from_onnx = _evaluate(tmp_path / "from-onnx", "--exported", str(export), "--data", str(data / name))
    assert abs(from_onnx["auc"] - report["sites"][0]["auc"]) <= 1e-6
    torch_rows = list(csv.DictReader(open(tmp_path / name / "predictions.csv")))
    onnx_rows = list(csv.DictReader(open(tmp_path / "from-onnx" / "predictions.csv")))
    assert [r["image"] for r in torch_rows] == [r["image"] for r in onnx_rows]
    gap = max(abs(float(a["probability_corrected"]) - float(b["probability_corrected"]))
              for a, b in zip(torch_rows, onnx_rows))
    assert gap < 1e-4


def test_onnx_logits_match_torch_on_the_same_inputs(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from fedrad.cli_site import load_run
    from fedrad.client.export import export_model, exported_outputs
    from fedrad.client.site_model import assemble

    _, data, out, report = run
    name = report["sites"][1]["name"]
    site = assemble(load_run(out), work=out / "sites" / name, bn="site")
    x = np.random.default_rng(1).normal(size=(5, 3, 64, 64)).astype(np.float32)
    import torch
    with torch.no_grad():
        expected = site.model(torch.from_numpy(x)).numpy()
    for fmt in ("onnx", "torchscript"):
        path = export_model(site, tmp_path / fmt, fmt, x[:2])
        logits, features = exported_outputs(path)(x)
        assert np.max(np.abs(logits - expected)) <= 1e-4 and features.shape == (5, 1280)


def test_a_never_seen_site_gets_predictions_with_pooled_and_adabn(run, tmp_path):
    _, data, out, report = run
    probs = {}
    for bn in ("pooled", "adabn"):
        assert main(["predict", "--model", str(out), "--bn", bn, "--data", str(data / "h2"), "--out",
                     str(tmp_path / bn)]) == 0
        rows = list(csv.DictReader(open(tmp_path / bn / "predictions.csv")))
        assert len(rows) == 48 and all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
        assert json.loads((tmp_path / bn / "model-card.json").read_text())["batchnorm"].startswith(bn)
        probs[bn] = np.array([float(r["probability"]) for r in rows])
    assert not np.allclose(probs["pooled"], probs["adabn"])  # AdaBN really re-estimated the statistics


def test_explain_writes_overlays_and_maps(run, tmp_path):
    _, data, out, report = run
    assert main(["predict", "--model", str(out), "--site-work", str(out / "sites" / "h0"), "--data", str(data / "h0"),
                 "--split", "test", "--explain", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    pngs, maps = sorted((tmp_path / "gradcam").glob("*.png")), sorted((tmp_path / "gradcam").glob("*.npy"))
    assert len(pngs) == len(maps) == len(rows) > 0
    cam = np.load(maps[0])
    assert cam.shape == (64, 64) and np.all(cam >= 0) and cam.max() > 0


def test_corrupt_dicom_is_skipped_with_a_reason(run, tmp_path):
    _, data, out, _ = run
    site = tmp_path / "h0"
    shutil.copytree(data / "h0", site)
    victim = sorted((site / "images").glob("*.dcm"))[0]
    victim.write_bytes(b"not a dicom file at all")
    assert main(["predict", "--model", str(out), "--site-work", str(out / "sites" / "h0"), "--data", str(site),
                 "--out", str(tmp_path / "p")]) == 0
    skipped = list(csv.DictReader(open(tmp_path / "p" / "skipped.csv")))
    assert [s["image"] for s in skipped] == [f"images/{victim.name}"] and "labels.csv line" in skipped[0]["reason"]
    assert len(list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))) == 47


def test_clear_errors(run, tmp_path, capsys):
    _, data, out, _ = run

    def error(*args):
        assert main(["predict", *args, "--data", str(data / "h0"), "--out", str(tmp_path / "p")]) == 2
        return " ".join(capsys.readouterr().err.split())  # rich wraps long lines

    text = error("--model", str(tmp_path / "nope"), "--site-work", str(out / "sites" / "h0"))
    assert "run folder" in text and "nope" in text
    other = tmp_path / "other-work"
    shutil.copytree(out / "sites" / "h0", other)
    own = json.loads((out / "global.json").read_text())["run_id"]
    (other / "local-state" / own).rename(other / "local-state" / "0123456789abcdef")
    text = error("--model", str(out), "--site-work", str(other))
    assert f"not from run {own}" in text and "0123456789abcdef" in text
    assert "--bn pooled" in error("--model", str(out))


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_every_site_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0
    assert f"fedrad {command} --model" in capsys.readouterr().out
