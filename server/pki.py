"""The cryptography of a deployment: a private CA, the coordinator's TLS certificate, site keys.

Flower's Deployment Engine needs two different things, and they are easy to confuse:
- **TLS** between every SuperNode (site) and the SuperLink (coordinator): the coordinator
  presents a certificate signed by our own CA; each site trusts only that CA (the CA
  certificate, never its key, goes into a site's bundle).
- **Node authentication**: each site signs its requests with its own EC P-384 key; the
  coordinator accepts only public keys registered with `flwr supernode register`. Flower
  reads both halves in OpenSSH format (`ecdsa-sha2-nistp384 ...`).

Pure functions over `cryptography` objects plus two writers that keep private keys
private (mode 0600, created exclusively, never silently replaced).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_CURVE = ec.SECP384R1()  # what Flower's node authentication accepts (a NIST curve, OpenSSH encoded)
TLS_CURVE = ec.SECP384R1()
PRIVATE_MODE = 0o600


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrad"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(common_name: str = "fedrad federation CA", *, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey,
                                                                                      x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(TLS_CURVE)
    name = _name(common_name)
    start = _now() - dt.timedelta(minutes=5)  # tolerate small clock skew between machines
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for the SAN extension (an IP literal becomes an IPAddress entry)."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"Coordinator name {name!r} is neither an IP address nor a DNS name; give "
                                 "--name the host name or address the sites will dial.") from None
            out.append(x509.DNSName(name))
    return out


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: Sequence[str], *,
                     days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The coordinator's TLS certificate, valid for every name/address in `names` (SANs).

    gRPC checks the address a site dials against the SANs, not the common name, so every
    name a site may use (DNS name, IP, `localhost`) must be listed.
    """
    if not names:
        raise ValueError("The coordinator certificate needs at least one name (--name HOST).")
    key = ec.generate_private_key(TLS_CURVE)
    start = _now() - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(subject_alt_names(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def cert_names(cert: x509.Certificate) -> list[str]:
    """The SAN entries of a certificate as strings (DNS names and IPs)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def make_node_keys() -> tuple[bytes, bytes]:
    """A site's node-authentication key pair: (private, public), both in OpenSSH format."""
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: what gRPC (the SuperLink's --ssl-keyfile) reads."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key; it was not made by `fedrad provision`.")
    return key


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write a private key readable by its owner only (0600).

    Without `replace` the file is created exclusively (O_EXCL): an existing key is never
    overwritten, even by a race. With `replace` the new key is written beside it and moved
    over it atomically, so a crash leaves either the old or the new key, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".new") if replace else path
    if replace:
        target.unlink(missing_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; fedrad never overwrites a private key silently "
                              "(use --rotate SITE or --force to replace it).") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(target, PRIVATE_MODE)  # O_CREAT's mode is filtered by the umask
    if replace:
        os.replace(target, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key (0644), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
