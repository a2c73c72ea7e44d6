"""PKI: the CA signs the coordinator certificate for its names; node keys are what Flower loads."""

import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedrad.server.pki import cert_names, make_ca, make_node_keys, make_server_cert, write_private


def test_server_certificate_is_signed_by_the_ca_for_every_name():
    ca_key, ca_cert = make_ca()
    key, cert = make_server_cert(ca_key, ca_cert, ["coord.example.org", "10.0.0.5", "localhost"])
    cert.verify_directly_issued_by(ca_cert)  # raises if the signature or issuer is wrong
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert sorted(cert_names(cert)) == ["10.0.0.5", "coord.example.org", "localhost"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_name_with_spaces_is_refused():
    ca_key, ca_cert = make_ca()
    with pytest.raises(ValueError, match="neither an IP address nor a DNS name"):
        make_server_cert(ca_key, ca_cert, ["my coordinator"])


def test_node_keys_are_p384_in_openssh_format():
    private, public = make_node_keys()
    assert public.startswith(b"ecdsa-sha2-nistp384 ")
    key = load_ssh_private_key(private, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public).public_numbers() == key.public_key().public_numbers()


def test_private_keys_are_0600_and_never_silently_overwritten(tmp_path):
    path = tmp_path / "k" / "node.key"
    old = os.umask(0o022)
    try:
        write_private(path, b"first")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="never overwrites a private key"):
        write_private(path, b"second")
    assert path.read_bytes() == b"first"
    write_private(path, b"second", replace=True)
    assert path.read_bytes() == b"second" and stat.S_IMODE(path.stat().st_mode) == 0o600
