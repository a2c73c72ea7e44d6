"""`fedrad provision`: the certificate folder of a federation, and one bundle per site.

Layout of the folder (the operator keeps it on the coordinator; `ca/ca.key` belongs offline
once provisioning is done):

    CERTS/ca/ca.crt, ca.key                      the federation's private CA
    CERTS/coordinator/ca.crt, server.pem, server.key   what `fedrad coordinator` serves TLS with
    CERTS/site-keys/<site>.pub                   public keys `fedrad register` admits
    CERTS/sites/<site>/                          the bundle for that hospital alone:
        ca.crt  node.key  node.pub  site.env  README.md

Re-running is additive and never silently replaces a key: existing CA, certificate and
site keys are kept and reported as such; new sites get new keys. Replacing a key takes an
explicit `--rotate SITE` (one site), `--renew-coordinator` (the TLS certificate), or
`--force` (everything, a new CA: every site needs its new bundle).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedrad.common.bundle import SiteBundle, site_env
from fedrad.server.pki import (
    cert_names,
    load_cert,
    load_pem_key,
    make_ca,
    make_node_keys,
    make_server_cert,
    pem_cert,
    pem_key,
    write_private,
    write_public,
)

DEFAULT_NAMES = ("localhost", "127.0.0.1")  # the coordinator's own tools dial it on loopback
DEFAULT_PORT = 8000
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class CertsLayout:
    """Where each file of a provisioned folder lives (one place for every path)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    @property
    def server_cert(self) -> Path:
        return self.coordinator / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.coordinator / "server.key"

    @property
    def coordinator_ca(self) -> Path:
        return self.coordinator / "ca.crt"

    def site_pub(self, site: str) -> Path:
        return self.root / "site-keys" / f"{site}.pub"

    def bundle(self, site: str) -> Path:
        return self.root / "sites" / site

    def sites(self) -> list[str]:
        """Sites with a public key here, sorted."""
        return sorted(p.stem for p in (self.root / "site-keys").glob("*.pub"))


@dataclass
class ProvisionResult:
    """What a provisioning run did, item by item: created, kept, rotated, renewed."""

    actions: list[tuple[str, str]] = field(default_factory=list)  # (item, action)

    def add(self, item: str, action: str) -> None:
        self.actions.append((item, action))


def check_site_name(site: str) -> str:
    if not SITE_NAME.match(site):
        raise ValueError(f"Site name {site!r} is not allowed: use letters, digits, '-', '_' or '.', starting with a "
                         "letter or digit (it names files, systemd instances and the site in reports).")
    return site


def provision(root: Path, *, sites: Sequence[str] = (), names: Sequence[str] = (), port: int = DEFAULT_PORT,
              rotate: Sequence[str] = (), renew_coordinator: bool = False, force: bool = False) -> ProvisionResult:
    """Create what is missing under `root`; replace only what `rotate`/`renew_coordinator`/`force` name."""
    layout = CertsLayout(Path(root))
    result = ProvisionResult()
    for site in (*sites, *rotate):
        check_site_name(site)
    unknown = sorted(set(rotate) - set(layout.sites()))
    if unknown and not force:
        raise ValueError(f"--rotate {unknown}: no such site under {layout.root / 'site-keys'}; "
                         f"known sites: {layout.sites()}. Add a new site with --site NAME.")

    ca_key, ca_cert = _ca(layout, force, result)
    new_ca = force or ("ca", "created") in result.actions
    _coordinator(layout, ca_key, ca_cert, names, renew=renew_coordinator or new_ca, result=result)
    address = f"{names[0] if names else _dial_name(layout)}:{port}"
    for site in sorted(set(sites) | set(layout.sites())):
        replace = new_ca or site in rotate
        _site(layout, site, address, ca_cert_pem=pem_cert(ca_cert), replace=replace, result=result)
    return result


def _dial_name(layout: CertsLayout) -> str:
    """The name sites dial by default: the certificate's first SAN that is not loopback."""
    names = [n for n in cert_names(load_cert(layout.server_cert)) if n not in DEFAULT_NAMES]
    return names[0] if names else DEFAULT_NAMES[1]


def _ca(layout: CertsLayout, force: bool, result: ProvisionResult):
    have_cert, have_key = layout.ca_cert.is_file(), layout.ca_key.is_file()
    if have_cert and have_key and not force:
        result.add("ca", "kept")
        return load_pem_key(layout.ca_key), load_cert(layout.ca_cert)
    if (have_cert or have_key) and not force:
        present = layout.ca_cert if have_cert else layout.ca_key
        raise FileNotFoundError(f"{present} exists without its other half under {layout.ca_cert.parent}; restore it, "
                                "or start over with --force (a new CA: every site needs a new bundle).")
    if not force and (layout.sites() or layout.server_cert.is_file()):
        raise FileNotFoundError(f"{layout.ca_cert} is missing but {layout.root} already holds keys; restore the CA "
                                "from your backup, or start over with --force (a new CA: every site needs a new "
                                "bundle).")
    key, cert = make_ca()
    write_private(layout.ca_key, pem_key(key), replace=force)
    layout.ca_key.parent.chmod(0o700)
    write_public(layout.ca_cert, pem_cert(cert))
    result.add("ca", "created")
    return key, cert


def _coordinator(layout: CertsLayout, ca_key, ca_cert, names: Sequence[str], *, renew: bool,
                 result: ProvisionResult) -> None:
    wanted = list(dict.fromkeys([*names, *DEFAULT_NAMES]))
    exists = layout.server_cert.is_file() and layout.server_key.is_file()
    if exists and not renew:
        have = cert_names(load_cert(layout.server_cert))
        if names and set(wanted) != set(have):
            raise ValueError(f"{layout.server_cert} is valid for {sorted(have)}, not {sorted(wanted)}; "
                             "re-issue it with --renew-coordinator (sites keep their keys and bundles).")
        result.add("coordinator certificate", "kept")
        return
    if exists and not names:
        wanted = list(dict.fromkeys([*cert_names(load_cert(layout.server_cert)), *DEFAULT_NAMES]))
    key, cert = make_server_cert(ca_key, ca_cert, wanted)
    write_private(layout.server_key, pem_key(key), replace=exists)
    layout.coordinator.chmod(0o700)
    write_public(layout.server_cert, pem_cert(cert))
    write_public(layout.coordinator_ca, pem_cert(ca_cert))
    result.add(f"coordinator certificate ({', '.join(wanted)})", "renewed" if exists else "created")


def _site(layout: CertsLayout, site: str, address: str, *, ca_cert_pem: bytes, replace: bool,
          result: ProvisionResult) -> None:
    bundle = SiteBundle(layout.bundle(site))
    key_path, pub_path = bundle.node_key, layout.site_pub(site)
    exists = key_path.is_file() and pub_path.is_file()
    if key_path.is_file() != pub_path.is_file():
        missing = pub_path if key_path.is_file() else key_path
        raise FileNotFoundError(f"Site {site}: {missing} is missing but its other half exists; restore it or "
                                f"replace the pair with --rotate {site}.")
    if exists and not replace:
        result.add(f"site {site}", "kept")
        return
    private, public = make_node_keys()
    bundle.root.mkdir(parents=True, exist_ok=True)
    bundle.root.chmod(0o700)
    write_private(key_path, private, replace=exists)
    write_public(bundle.node_pub, public)
    write_public(pub_path, public)
    write_public(bundle.ca_cert, ca_cert_pem)
    if not bundle.env_file.is_file():  # an operator's edit of the address survives a rotation
        write_public(bundle.env_file, site_env(site, address).encode())
    write_public(bundle.root / "README.md", bundle_readme(site).encode())
    result.add(f"site {site}", "rotated" if exists else "created")


def bundle_readme(site: str) -> str:
    return f"""# fedrad site bundle: {site}

Hand this folder to the {site} site only. It holds:

- `node.key`: this site's private node-authentication key (EC P-384, OpenSSH format).
  Secret: mode 0600, readable by the account that runs the site daemon only. Never copy
  it elsewhere; if it leaks, ask the coordinator to rotate it (`fedrad provision --rotate {site}`).
- `node.pub`: its public half (the coordinator has registered it).
- `ca.crt`: the federation CA; the site trusts a coordinator whose certificate it signed.
- `site.env`: the site name and the coordinator's address.

Start the site daemon (it waits for the coordinator and keeps running):

    fedrad site --bundle /etc/fedrad/bundle --data /srv/fedrad/data --work /var/lib/fedrad/work

`--data` is the site folder (DICOM files + labels.csv); nothing in it ever leaves the site.
`--work` is where the site keeps its own state (BatchNorm per round, summaries).
See deploy/README.md of fedrad for the systemd unit and the container.
"""
