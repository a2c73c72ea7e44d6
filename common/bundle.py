"""A site's bundle: the folder `fedrad provision` writes for one hospital, `fedrad site` reads.

    ca.crt     the federation CA certificate (whom the site trusts)
    node.key   the site's private node-authentication key (0600; the site's identity)
    node.pub   its public half (registered at the coordinator)
    site.env   FEDRAD_SITE=<name>, FEDRAD_SUPERLINK=<host:port> (also a systemd EnvironmentFile)
    README.md  what each file is, how to start the daemon
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SiteBundle:
    """The files of one site's bundle folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def node_key(self) -> Path:
        return self.root / "node.key"

    @property
    def node_pub(self) -> Path:
        return self.root / "node.pub"

    @property
    def env_file(self) -> Path:
        return self.root / "site.env"

    def env(self) -> dict[str, str]:
        """The KEY=VALUE pairs of site.env ({} when there is none)."""
        if not self.env_file.is_file():
            return {}
        out = {}
        for line in self.env_file.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip().strip("'\"")
        return out

    def check(self) -> None:
        """Refuse a bundle that is incomplete or whose private key others can read."""
        for path in (self.ca_cert, self.node_key):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the site bundle must be the folder "
                                        "`fedrad provision` wrote for this site (CERTS/sites/<site>).")
        mode = stat.S_IMODE(self.node_key.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(f"{self.node_key} is readable by others (mode {mode:o}); run "
                                  f"`chmod 600 {self.node_key}` (the site's identity must stay private).")


def site_env(site: str, address: str) -> str:
    """KEY=VALUE lines read by `fedrad site --bundle` and by systemd's EnvironmentFile=."""
    return (f"# fedrad site bundle of {site}; edit FEDRAD_SUPERLINK if the coordinator moves.\n"
            f"FEDRAD_SITE={site}\nFEDRAD_SUPERLINK={address}\n")
