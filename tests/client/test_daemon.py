"""`fedrad site`: the SuperNode's flags come from the bundle, and a bad bundle is refused up front."""

import shlex

import pytest

from fedrad.client.daemon import supernode_command
from fedrad.common.bundle import SiteBundle
from fedrad.server.provision import provision


@pytest.fixture
def bundle(tmp_path):
    provision(tmp_path / "certs", sites=["h-a"], names=["coord.example.org"])
    return SiteBundle(tmp_path / "certs" / "sites" / "h-a")


@pytest.fixture
def site_dir(tmp_path):
    folder = tmp_path / "my data"  # a space in the path travels intact
    folder.mkdir()
    (folder / "labels.csv").write_text("image,label,split\n")
    return folder


def test_supernode_uses_the_bundle_tls_key_and_node_config(bundle, site_dir, tmp_path):
    argv = supernode_command(bundle, site_dir, tmp_path / "work", port=9101)
    flags = dict(zip(argv[1::1], argv[2::1]))
    assert argv[0].endswith("flower-supernode")
    assert flags["--superlink"] == "coord.example.org:8000"
    assert flags["--root-certificates"] == str(bundle.ca_cert) and flags["--auth-supernode-private-key"] == str(
        bundle.node_key)
    assert "--insecure" not in argv and flags["--port"] == "9101"
    config = dict(kv.split("=", 1) for kv in shlex.split(flags["--node-config"].replace("'", '"')))
    assert config == {"site-name": "h-a", "data-dir": str(site_dir), "work-dir": str(tmp_path / "work")}
    assert supernode_command(bundle, site_dir, tmp_path / "w", superlink="10.0.0.1:8000")[2] == "10.0.0.1:8000"


def test_a_key_others_can_read_is_refused(bundle, site_dir, tmp_path):
    bundle.node_key.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        supernode_command(bundle, site_dir, tmp_path / "work")


def test_a_folder_without_labels_is_refused(bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        supernode_command(bundle, tmp_path, tmp_path / "work")


def test_a_quote_in_a_path_is_refused_with_the_reason(bundle, tmp_path):
    folder = tmp_path / "it's"
    folder.mkdir()
    (folder / "labels.csv").write_text("image,label,split\n")
    with pytest.raises(ValueError, match="contains a quote"):
        supernode_command(bundle, folder, tmp_path / "work")
