"""The site's side of harmonisation and the shift score, through the real ClientApp handlers."""

import shutil

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

import fedrad.client.app as site_app
from fedrad.client.dataset import load_site
from fedrad.client.reference import load_inputs, site_intensity, site_preprocessor
from fedrad.common.config import RunConfig
from fedrad.common.feature_shift import projection
from fedrad.common.harmonize import N_BINS, HarmonizationWarning
from fedrad.common.records import config_record, from_numpy
from tests.client.test_app import message
from tests.helpers import tiny_site as tiny_site_in
from tests.helpers import write_dicom

pytestmark = pytest.mark.usefixtures("flower_task")


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    return tiny_site_in(tmp_path_factory.mktemp("data"), seed=1, kernel="sharp", hu_offset=60, manufacturer="GE")


def context(folder, tmp_path):
    return Context(run_id=1, node_id=1, node_config={"data-dir": str(folder), "work-dir": str(tmp_path / "w")},
                   state=RecordDict(), run_config={})


def query(cfg, kind, reference=None):
    content = RecordDict({"config": config_record(cfg.to_run_config(), {"fedrad-query": kind})})
    if reference is not None:
        content["reference"] = from_numpy(reference)
    return Message(content=content, dst_node_id=1, message_type="query")


def test_reference_query_sends_only_the_histogram_and_the_spacing_summary(tiny_site, tmp_path):
    cfg = RunConfig(fov_mm=32.0, out_dir=str(tmp_path))
    out = site_app.query(query(cfg, "reference"), context(tiny_site, tmp_path)).content
    assert set(out.keys()) == {"intensity", "metrics", "site"}
    assert list(out["intensity"].keys()) == ["histogram"]
    counts = out["intensity"]["histogram"].numpy()
    assert counts.shape == (N_BINS,) and counts.dtype == np.int64
    metrics = dict(out["metrics"])
    n_train = sum(1 for line in (tiny_site / "labels.csv").read_text().splitlines()[1:] if ",train," in line)
    assert metrics["n-images"] == n_train and metrics["n-pixels"] == n_train * cfg.image_size**2 == counts.sum()
    assert metrics["spacing-median-mm"] == pytest.approx(0.8)
    # with the spacing left to the coordinator the site sends its spacings only
    auto = site_app.query(query(cfg.replace(spacing_mm=0.0), "reference"), context(tiny_site, tmp_path)).content
    assert set(auto.keys()) == {"metrics", "site"} and dict(auto["metrics"])["spacing-median-mm"] == pytest.approx(0.8)


def test_shift_query_and_evaluate_send_projected_moments_only(tiny_site, tmp_path):
    cfg = RunConfig(fov_mm=32.0, out_dir=str(tmp_path), harmonize="quantile", shift_dim=8)
    own = site_intensity(tiny_site, cfg).counts
    reference = {"reference-histogram": np.roll(own, 20), "projection": projection(1280, 8, seed=0)}  # 40 HU higher
    out = site_app.query(query(cfg, "shift", reference), context(tiny_site, tmp_path)).content
    assert set(out["moments"].keys()) == {"raw/feature-mean", "raw/feature-cov", "harmonized/feature-mean",
                                          "harmonized/feature-cov"}
    assert out["moments"]["raw/feature-cov"].numpy().shape == (8, 8)
    assert dict(out["metrics"]) == {"n-features": 16}  # every train + test image, as one summary
    raw, harmonized = out["moments"]["raw/feature-mean"].numpy(), out["moments"]["harmonized/feature-mean"].numpy()
    assert not np.allclose(raw, harmonized)  # the map changed what the CNN sees
    msg = message(cfg, "evaluate")
    msg.content["reference"] = from_numpy(reference)
    evaluated = site_app.evaluate_(msg, context(tiny_site, tmp_path)).content
    assert set(evaluated.keys()) == {"metrics", "site", "moments"}
    assert {k: v.numpy().shape for k, v in evaluated["moments"].items()} == {"feature-mean": (8,),
                                                                            "feature-cov": (8, 8)}


def test_harmonisation_changes_the_cnn_input_and_the_feature_cache_key(tiny_site, tmp_path):
    cfg = RunConfig(fov_mm=32.0, out_dir=str(tmp_path), harmonize="quantile")
    own = site_intensity(tiny_site, cfg).counts
    plain = site_preprocessor(cfg.replace(harmonize="off"), tiny_site, None)
    matched = site_preprocessor(cfg.replace(harmonize_split_hu=-1024.0), tiny_site, np.roll(own, 20))
    assert plain.intensity_map is None and matched.intensity_map is not None
    assert repr(plain) != repr(matched)  # the load memo and the feature cache are keyed by this repr
    same = site_preprocessor(cfg, tiny_site, own)  # matching a site to itself changes (almost) nothing
    hu = np.array([-850.0, -300.0, 60.0, 160.0])
    np.testing.assert_allclose(same.intensity_map(hu), hu, atol=2.0)
    np.testing.assert_allclose(matched.intensity_map(hu), hu + 40.0, atol=2.0)  # a reference 40 HU higher
    with pytest.raises(ValueError, match="site tiny: harmonize = 'quantile' but the coordinator sent no reference"):
        site_preprocessor(cfg, tiny_site, None)


def test_a_site_with_a_constant_image_and_too_few_pixels_warns_and_trains(tiny_site, tmp_path):
    folder = tmp_path / "blank"
    shutil.copytree(tiny_site, folder)
    write_dicom(folder / "images" / "blank.dcm", np.full((96, 96), 24, np.uint16), pixel_spacing=(0.8, 0.8),
                slope=1.0, intercept=-1024.0)
    with open(folder / "labels.csv", "a") as f:
        f.write("images/blank.dcm,0,train,,\n")
    cfg = RunConfig(fov_mm=32.0, out_dir=str(tmp_path), harmonize="quantile", local_epochs=1, batch_size=8)
    with pytest.warns(HarmonizationWarning, match="site blank: 1 of its crops are constant"):
        own = site_intensity(folder, cfg)
    assert own.n_constant == 1
    thin = np.zeros(N_BINS, np.int64)
    thin[100:110] = 10  # a reference of 100 pixels
    with pytest.warns(HarmonizationWarning, match="the reference histogram has only 100 pixels"):
        pre = site_preprocessor(cfg, folder, thin)
    assert pre.intensity_map.method == "identity"
    msg = message(cfg, "train")
    msg.content["reference"] = from_numpy({"reference-histogram": own.counts})
    out = site_app.train(msg, context(folder, tmp_path)).content  # trains, no crash
    assert dict(out["metrics"])["n-train"] == (folder / "labels.csv").read_text().count(",train,")


def test_the_histogram_pass_keeps_the_raw_cnn_inputs_so_the_next_load_decodes_nothing(tiny_site, tmp_path,
                                                                                      monkeypatch):
    import fedrad.client.dataset as dataset
    import fedrad.client.loaded_sites as loaded_sites
    from fedrad.client.dataset import load_site
    from fedrad.client.loaded_sites import load_site_cached
    from fedrad.client.reference import _MEMO, raw_preprocessor

    cfg = RunConfig(spacing_mm=0.5, fov_mm=16.0)
    alone = site_intensity(tiny_site, cfg)
    _MEMO.clear()
    loaded_sites._LOADED.clear()
    teed = site_intensity(tiny_site, cfg, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(teed.counts, alone.counts)
    assert (teed.n_images, teed.spacing_mm) == (alone.n_images, alone.spacing_mm)
    assert len(list((tmp_path / "cache").glob("pixels-*.npz"))) == 1
    fresh = load_site(tiny_site, raw_preprocessor(cfg))
    loaded_sites._LOADED.clear()  # a new process: only the site's own store is left

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(dataset, "read_image", no_decoding)
    monkeypatch.setattr(dataset, "_DECODED", dataset.BoundedLRU(1, size=lambda image: 2))
    kept = load_site_cached(tiny_site, raw_preprocessor(cfg), cache_dir=tmp_path / "cache")
    for name in ("x_train", "x_test", "x_unlabelled", "y_train", "y_test"):
        np.testing.assert_array_equal(getattr(kept, name), getattr(fresh, name), err_msg=name)
    assert (kept.keys_train, kept.keys_test, kept.preprocessing) == (fresh.keys_train, fresh.keys_test,
                                                                     fresh.preprocessing)


@pytest.fixture
def decodes(monkeypatch):
    """(list of files decoded so far, a function that forgets what this process remembers)."""
    import fedrad.client.dataset as dataset
    import fedrad.client.loaded_sites as loaded_sites
    import fedrad.client.reference as reference_module

    decoded = []
    real = dataset.read_image
    monkeypatch.setattr(dataset, "read_image", lambda path: decoded.append(path) or real(path))

    def fresh_process():
        reference_module._MEMO.clear()
        loaded_sites._LOADED.clear()
        dataset._DECODED.clear()

    return decoded, fresh_process


def test_before_round_one_each_file_is_decoded_once_even_across_processes(tiny_site, tmp_path, decodes):
    """The reference query's read also yields the CNN inputs; the shift query (here as if in a fresh process,
    as in the Deployment Engine or on another Simulation actor) finds them in the site's store."""
    decoded, fresh_process = decodes
    cfg = RunConfig(fov_mm=32.0, out_dir=str(tmp_path), shift_dim=8)
    fresh_process()
    out = site_app.query(query(cfg, "reference"), context(tiny_site, tmp_path)).content
    n_files = len(list(tiny_site.rglob("*.dcm")))
    assert len(decoded) == n_files > 0
    fresh_process()
    reference = {"reference-histogram": out["intensity"]["histogram"].numpy(),
                 "projection": projection(1280, 8, seed=0)}
    site_app.query(query(cfg, "shift", reference), context(tiny_site, tmp_path))
    assert len(decoded) == n_files  # nothing decoded again


def test_with_harmonisation_a_fresh_process_fits_its_map_without_decoding(tiny_site, tmp_path, decodes, caplog):
    """Every message needs the site's own histogram to fit its map; in the Deployment Engine each message is a
    new process. The histogram is kept in the site's cache folder, so only the first message reads the files."""
    decoded, fresh_process = decodes
    cfg = RunConfig(fov_mm=32.0, out_dir=str(tmp_path), shift_dim=8, harmonize="quantile")
    fresh_process()
    out = site_app.query(query(cfg, "reference"), context(tiny_site, tmp_path)).content
    counts = out["intensity"]["histogram"].numpy()
    reference = {"reference-histogram": np.roll(counts, 20), "projection": projection(1280, 8, seed=0)}
    fresh_process()
    site_app.query(query(cfg, "shift", reference), context(tiny_site, tmp_path))  # makes the harmonised inputs
    n_files = len(list(tiny_site.rglob("*.dcm")))
    assert len(decoded) == n_files  # harmonised inputs made from the HU crops the histogram pass kept
    fresh_process()
    msg = message(cfg, "evaluate")
    msg.content["reference"] = from_numpy(reference)
    site_app.evaluate_(msg, context(tiny_site, tmp_path))
    assert len(decoded) == n_files  # histogram and harmonised inputs both came from the site's disk
    (kept,) = (tmp_path / "w").rglob("intensity-*.npz")
    fresh_process()
    made = load_inputs(cfg, tiny_site, reference["reference-histogram"], cache_dir=kept.parent)
    read = load_site(tiny_site, site_preprocessor(cfg, tiny_site, reference["reference-histogram"]))
    assert made.preprocessing == read.preprocessing and "IntensityMatch" in made.preprocessing
    for name in ("x_train", "x_test", "x_unlabelled", "y_train", "y_test"):
        np.testing.assert_array_equal(getattr(made, name), getattr(read, name), err_msg=name)
    fresh_process()
    kept.write_bytes(b"torn")
    with caplog.at_level("WARNING", logger="fedrad.site"):
        again = site_intensity(tiny_site, cfg, cache_dir=kept.parent)
    assert "unreadable intensity file" in caplog.text and str(kept) in caplog.text
    np.testing.assert_array_equal(again.counts, counts)
