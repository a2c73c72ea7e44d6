"""`fedrad provision`: layout, permissions, and that re-running never replaces a key unasked."""

import stat

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedrad.common.bundle import SiteBundle
from fedrad.server.pki import cert_names, load_cert
from fedrad.server.provision import CertsLayout, provision


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def certs(tmp_path):
    root = tmp_path / "certs"
    provision(root, sites=["h-a", "h-b"], names=["coord.example.org"], port=9443)
    return root


def test_layout_permissions_and_bundle(certs):
    layout = CertsLayout(certs)
    assert layout.sites() == ["h-a", "h-b"]
    for private in (layout.ca_key, layout.server_key, certs / "sites" / "h-a" / "node.key"):
        assert mode(private) == 0o600
    assert mode(certs / "sites" / "h-a") == 0o700 and mode(layout.ca_key.parent) == 0o700
    assert set(cert_names(load_cert(layout.server_cert))) == {"coord.example.org", "localhost", "127.0.0.1"}
    load_cert(layout.server_cert).verify_directly_issued_by(load_cert(layout.ca_cert))
    bundle = SiteBundle(certs / "sites" / "h-a")
    assert sorted(p.name for p in bundle.root.iterdir()) == ["README.md", "ca.crt", "node.key", "node.pub", "site.env"]
    assert "ca.key" not in {p.name for p in bundle.root.iterdir()}  # the CA's key never goes to a site
    assert bundle.env() == {"FEDRAD_SITE": "h-a", "FEDRAD_SUPERLINK": "coord.example.org:9443"}
    assert bundle.ca_cert.read_bytes() == layout.ca_cert.read_bytes()
    key = load_ssh_private_key(bundle.node_key.read_bytes(), None)
    assert layout.site_pub("h-a").read_bytes().split()[1] in bundle.node_pub.read_bytes()
    assert key.curve.name == "secp384r1"


def test_rerun_keeps_every_key_and_adds_new_sites(certs):
    before = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    result = provision(certs, sites=["h-c"])
    assert ("site h-c", "created") in result.actions and ("site h-a", "kept") in result.actions
    assert all(p.read_bytes() == data for p, data in before.items() if p.name != "README.md")
    # the new site dials the coordinator's real name, not loopback
    assert SiteBundle(certs / "sites" / "h-c").env()["FEDRAD_SUPERLINK"] == "coord.example.org:8000"


def test_rotate_replaces_exactly_one_site_key(certs):
    a_key, b_key = (certs / "sites" / s / "node.key" for s in ("h-a", "h-b"))
    a_before, b_before = a_key.read_bytes(), b_key.read_bytes()
    result = provision(certs, rotate=["h-a"])
    assert ("site h-a", "rotated") in result.actions and ("site h-b", "kept") in result.actions
    assert a_key.read_bytes() != a_before and b_key.read_bytes() == b_before
    assert mode(a_key) == 0o600
    with pytest.raises(ValueError, match="no such site"):
        provision(certs, rotate=["h-zz"])


def test_other_names_need_an_explicit_renewal(certs):
    with pytest.raises(ValueError, match="--renew-coordinator"):
        provision(certs, names=["other.example.org"])
    key_before = (certs / "sites" / "h-a" / "node.key").read_bytes()
    provision(certs, names=["other.example.org"], renew_coordinator=True)
    assert "other.example.org" in cert_names(load_cert(CertsLayout(certs).server_cert))
    assert (certs / "sites" / "h-a" / "node.key").read_bytes() == key_before


def test_a_lost_ca_is_not_silently_replaced(certs):
    CertsLayout(certs).ca_key.unlink()
    with pytest.raises(FileNotFoundError, match="--force"):
        provision(certs)
    (CertsLayout(certs).ca_cert).unlink()
    with pytest.raises(FileNotFoundError, match="restore the CA"):
        provision(certs)
    result = provision(certs, force=True)
    assert ("ca", "created") in result.actions and ("site h-a", "rotated") in result.actions


def test_bad_site_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not allowed"):
        provision(tmp_path / "c", sites=["../evil"])
