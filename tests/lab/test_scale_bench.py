"""fedrad bench --virtual-sites / --tiny-sites: the tiny sites it makes and how it splits memory by role."""

from fedrad.client.policy import load_policy
from fedrad.lab.scale_bench import make_tiny_sites, role, tiny_sites_folder


def test_tiny_sites_are_real_site_folders_with_a_policy_that_lets_them_train(tmp_path):
    data = make_tiny_sites(tmp_path / "data", 2, patients=4)
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    assert [f.name for f in folders] == ["s000", "s001"]
    for folder in folders:
        assert (folder / "labels.csv").is_file() and len(list((folder / "images").glob("*.dcm"))) == 4
        assert load_policy(folder / "site-policy.toml").min_count == 2


def test_the_temporary_folder_is_removed_afterwards():
    with tiny_sites_folder(1, patients=2) as data:
        assert (data / "s000" / "labels.csv").is_file()
    assert not data.exists()


def test_processes_are_split_into_driver_actors_and_ray():
    assert role("/venv/bin/python", True) == "driver"
    assert role("ray::ClientAppActor.run", False) == role("ray::IDLE", False) == "actors"
    assert role("ray::DashboardAgent", False) == role("ray::RuntimeEnvAgent", False) == "ray"
    assert role("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", False) == "ray"


def test_zero_virtual_sites_is_refused_not_taken_for_the_default_benchmark(tmp_path):
    import pytest

    from fedrad.cli import main

    with pytest.raises(SystemExit, match="--virtual-sites 0: give at least 1 site"):
        main(["bench", "--virtual-sites", "0", "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()  # nothing ran
