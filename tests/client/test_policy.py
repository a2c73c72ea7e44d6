"""The site decides what leaves: its policy file, a curious coordinator refused, small counts withheld, the log."""

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

import fedrad.client.app as site_app
from fedrad.client import egress_log
from fedrad.client.policy import POLICY_FILE, PolicyError, SitePolicy, load_policy, what_travels
from fedrad.common.config import RunConfig
from fedrad.common.feature_shift import projection
from fedrad.common.model import build_model
from fedrad.common.records import from_numpy, to_array_record
from fedrad.lab.synth import SiteSpec, generate
from tests.client.test_app import message

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("flower_task")
CFG = dict(local_epochs=1, batch_size=8, fov_mm=32.0)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site of 40 patients (26 train, 14 test): above the default min-count of 11 where it matters."""
    root = tmp_path_factory.mktemp("data")
    (folder,) = generate(root, sites=[SiteSpec(name="h", n_patients=40, prevalence=0.5, spacing_mm=0.8,
                                               noise_hu=10, kernel="smooth", hu_offset=0, manufacturer="GE")],
                         seed=3, image_size=96)
    return folder


def context(folder, work, **node):
    return Context(run_id=7, node_id=1, node_config={"data-dir": str(folder), "work-dir": str(work), **node},
                   state=RecordDict(), run_config={})


def refused_with(out, code, work, text):
    assert out.has_error() and out.error.reason.startswith(f"{code} incident="), out.error
    incident = out.error.reason.split("=")[1]
    log = (work / "incidents.log").read_text()
    assert f"incident {incident} ({code})" in log and re.search(text, log), log[-600:]


# ---- the policy file ---------------------------------------------------------------------------------------

def test_a_policy_file_is_read_checked_and_hashed(tmp_path):
    assert load_policy(None) == SitePolicy()
    path = tmp_path / "p.toml"
    path.write_text('bn-modes = ["fedbn"]\nfreeze-blocks = [12, 17]\nmin-count = 20\nmin-dp-noise = 1\n')
    policy = load_policy(path)
    assert (policy.bn_modes, policy.freeze_blocks, policy.min_count, policy.min_dp_noise) == (("fedbn",), (12, 17),
                                                                                              20, 1.0)
    assert policy.sha256() != SitePolicy().sha256() and len(policy.sha256()) == 64
    assert policy.refusals(RunConfig()) == []
    assert len(policy.refusals(RunConfig(bn_mode="shared", freeze_blocks=3))) == 2


@pytest.mark.parametrize("text, match", [("min-count = 11\nsend-pixels = true\n", r"unknown key\(s\) \['send-pixels'\]"),
                                         ("min-count = '11'\n", "'min-count' must be int"),
                                         ("freeze-blocks = [3]\n", r"must be \[low, high\]"),
                                         ("bn-modes = ['fedprox']\n", "bn-modes must be a subset"),
                                         ("min-count = = 3\n", "not a readable TOML")])
def test_a_bad_policy_file_is_refused_naming_the_file(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=match) as err:
        load_policy(path)
    assert str(path) in str(err.value)


def test_the_readme_what_travels_table_is_the_code_s():
    readme = (ROOT / "README.md").read_text()
    assert what_travels() in readme, "README's what-travels table differs from fedrad.client.policy.what_travels()"
    assert "bn-stats" in what_travels() and "yes (dp-clip > 0)" in what_travels()


# ---- a curious coordinator ----------------------------------------------------------------------------------

def test_a_coordinator_asking_for_the_site_s_own_bn_is_refused(site, tmp_path):
    cfg = RunConfig(**CFG, out_dir=str(tmp_path))
    model = build_model(cfg)
    msg = message(cfg, "train")
    state = model.state_dict()
    local_bn = [k for k in state if k.startswith("_bn1.")]  # site-local in fedbn: the coordinator names it
    msg.content["arrays"] = to_array_record(state, [*msg.content["arrays"].keys(), *local_bn])
    out = site_app.train(msg, context(site, tmp_path / "w"))
    refused_with(out, "policy-refused", tmp_path / "w", r"extra \['_bn1")


def test_a_wider_shape_is_refused(site, tmp_path):
    cfg = RunConfig(**CFG, out_dir=str(tmp_path))
    msg = message(cfg, "train")
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    arrays["_fc.weight"] = np.zeros((2, 2560), np.float32)
    msg.content["arrays"] = from_numpy(arrays)
    refused_with(site_app.train(msg, context(site, tmp_path / "w")), "policy-refused", tmp_path / "w",
                 "other shapes")


def test_a_bn_mode_outside_the_policy_is_refused(site, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('bn-modes = ["fedbn"]\n')
    cfg = RunConfig(**CFG, out_dir=str(tmp_path), bn_mode="shared")
    out = site_app.evaluate_(message(cfg, "evaluate"), context(site, tmp_path / "w", **{"policy-file": str(policy)}))
    refused_with(out, "policy-refused", tmp_path / "w", "bn-mode 'shared' is not one of the site's")


@pytest.mark.parametrize("case", ["larger-shift-dim", "not-orthonormal", "other-seed"])
def test_moments_for_a_projection_the_site_did_not_agree_to_are_withheld(site, tmp_path, case):
    shift_dim = 32 if case == "larger-shift-dim" else 8
    cfg = RunConfig(**CFG, out_dir=str(tmp_path), shift_dim=shift_dim)
    p = projection(1280, shift_dim, seed=cfg.seed)
    if case == "not-orthonormal":
        p = p * 3.0
    if case == "other-seed":
        p = projection(1280, shift_dim, seed=cfg.seed + 1)
    msg = message(cfg, "evaluate")
    msg.content["reference"] = from_numpy({"projection": p})
    out = site_app.evaluate_(msg, context(site, tmp_path / "w")).content
    assert "moments" not in out and dict(out["withheld"]) == {"moments": "policy-refused"}
    assert out["metrics"]["n-features"] == 0


def test_the_site_s_own_projection_gets_its_moments(site, tmp_path):
    cfg = RunConfig(**CFG, out_dir=str(tmp_path), shift_dim=8)
    msg = message(cfg, "evaluate")
    msg.content["reference"] = from_numpy({"projection": projection(1280, 8, seed=cfg.seed)})
    out = site_app.evaluate_(msg, context(site, tmp_path / "w")).content
    assert out["moments"]["feature-cov"].numpy().shape == (8, 8) and "withheld" not in out


def test_a_policy_without_histograms_withholds_them(site, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("send-histogram = false\n")
    cfg = RunConfig(**CFG, out_dir=str(tmp_path))
    msg = message(cfg, "query")
    msg.content["config"]["fedrad-query"] = "reference"
    out = site_app.query(msg, context(site, tmp_path / "w", **{"policy-file": str(policy)})).content
    assert set(out.keys()) == {"metrics", "site", "withheld"} and dict(out["withheld"]) == {
        "histogram": "policy-refused"}


# ---- small counts ------------------------------------------------------------------------------------------

@pytest.fixture
def small_site(tmp_path):
    """16 patients (11 train, 5 test) under the default policy (min-count 11)."""
    from tests.helpers import tiny_site

    folder = tiny_site(tmp_path / "data", seed=1)
    (folder / POLICY_FILE).unlink()
    return folder


def test_a_site_with_5_test_images_sends_no_test_metrics(small_site, tmp_path):
    cfg = RunConfig(**CFG, out_dir=str(tmp_path))
    out = site_app.evaluate_(message(cfg, "evaluate"), context(small_site, tmp_path / "w")).content
    metrics = dict(out["metrics"])
    assert metrics["num-examples"] < 11 and not {"auc", "ece", "balanced-accuracy", "test-loss"} & set(metrics)
    assert dict(out["withheld"]) == {"test-metrics": "small-count"}


def test_histogram_and_moments_below_min_count_are_withheld(small_site, tmp_path):
    cfg = RunConfig(**CFG, out_dir=str(tmp_path), shift_dim=8)
    msg = message(cfg, "query")
    msg.content["config"]["fedrad-query"] = "reference"
    (small_site / POLICY_FILE).write_text("min-count = 30\n")
    out = site_app.query(msg, context(small_site, tmp_path / "w")).content
    assert "intensity" not in out and dict(out["withheld"]) == {"histogram": "small-count"}
    (small_site / POLICY_FILE).write_text("min-count = 2\n")
    msg = message(cfg.replace(shift_dim=12), "query")  # moments of 12 dimensions need 24 images; the site has 16
    msg.content["config"]["fedrad-query"] = "shift"
    msg.content["reference"] = from_numpy({"projection": projection(1280, 12, seed=cfg.seed)})
    out = site_app.query(msg, context(small_site, tmp_path / "w")).content
    assert "moments" not in out and dict(out["withheld"]) == {"moments": "small-count"}


def test_training_below_min_count_sends_no_update(small_site, tmp_path):
    (small_site / POLICY_FILE).write_text("min-count = 20\n")
    out = site_app.train(message(RunConfig(**CFG, out_dir=str(tmp_path)), "train"), context(small_site, tmp_path / "w"))
    refused_with(out, "small-count", tmp_path / "w", "fewer than the policy's min-count 20")


def test_a_header_less_labels_csv_reaches_the_coordinator_as_a_code_only(tmp_path):
    folder = tmp_path / "data" / "x"
    folder.mkdir(parents=True)
    (folder / "labels.csv").write_text("doe_john_mrn12345.dcm,1,train\n")
    out = site_app.train(message(RunConfig(**CFG, out_dir=str(tmp_path)), "train"), context(folder, tmp_path / "w"))
    assert out.has_error() and out.error.code == 100
    assert "doe_john" not in out.error.reason and re.fullmatch(r"site-data incident=[0-9a-f]{12}", out.error.reason)
    assert "doe_john_mrn12345" in (tmp_path / "w" / "incidents.log").read_text()  # the text stays at the site


# ---- the egress log ----------------------------------------------------------------------------------------

def test_the_egress_log_matches_what_the_coordinator_receives_byte_for_byte(site, tmp_path, capsys):
    cfg = RunConfig(**CFG, out_dir=str(tmp_path))
    work = tmp_path / "w"
    out = site_app.train(message(cfg, "train"), context(site, work))
    received = recorddict_from_proto(recorddict_to_proto(out.content))  # what the wire carries to the coordinator
    (entry,) = egress_log.read(work)
    assert entry["records"] == egress_log.describe_content(received)
    assert entry["run"] == 7 and entry["round"] == 1 and entry["type"] == "train"
    assert entry["policy_sha256"] == SitePolicy().sha256()
    arrays = entry["records"]["arrays"]
    assert set(arrays) == set(received["arrays"].keys())
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in arrays.values())
    from fedrad.cli import main

    assert main(["audit", "--work", str(work)]) == 0
    printed = capsys.readouterr().out
    assert "run 7" in printed and "arrays (" in printed and SitePolicy().sha256()[:12] in printed


def test_audit_without_a_log_says_so(tmp_path):
    from fedrad.cli import main

    assert main(["audit", "--work", str(tmp_path)]) != 0



def test_priors_read_off_a_small_class_cell_are_withheld_with_the_counts():
    from fedrad.client.app import LABELLED_PRIOR_KEYS, suppress_small_counts
    from tests.helpers import array_site

    data = array_site(n=40)
    data.y_train[:] = 0
    data.y_train[:3] = 1  # 3 malignant training images: a small cell at min-count 11
    data.y_test = np.zeros(20, dtype=np.int64)
    metrics = {"auc": 0.9, "prior-labelled": 0.1, "prior-site": 0.1, "prior-deploy-labelled": 0.1, "prior-em": 0.4}
    out, _ = suppress_small_counts(metrics, data, SitePolicy())
    assert not set(LABELLED_PRIOR_KEYS) & set(out) and out["auc"] == 0.9
    data.y_train[:20] = 1  # 20 and 20: no small cell
    out, _ = suppress_small_counts(metrics, data, SitePolicy())
    assert set(LABELLED_PRIOR_KEYS) <= set(out)
