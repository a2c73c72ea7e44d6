"""`fedrad site`: one hospital's long-running site daemon (a Flower SuperNode) from its bundle.

The bundle (`fedrad provision` made it; see `fedrad.server.provision`) gives the CA certificate to
trust, the site's private node key and its name. This module checks what a SuperNode
would only discover later (a world-readable key, a data folder without labels.csv), then
builds the `flower-supernode` command line: TLS against our CA, node authentication with
the site key, and node config `site-name`, `data-dir`, `work-dir` for the ClientApp.
Runtime dependency installation stays off (Flower's SuperNode default).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedrad.client.policy import load_policy
from fedrad.common.bundle import SiteBundle
from fedrad.common.flower_tools import flower_binary, flower_env, toml_literal


def supernode_command(bundle: SiteBundle, data_dir: Path, work_dir: Path, *, superlink: str | None = None,
                      site: str | None = None, port: int = 9094, max_retries: int | None = None,
                      policy: Path | None = None) -> list[str]:
    """The `flower-supernode` command line of one site (`policy`: the site's policy file, checked here)."""
    bundle.check()
    env = bundle.env()
    site = site or env.get("FEDRAD_SITE")
    superlink = superlink or env.get("FEDRAD_SUPERLINK")
    if not site:
        raise ValueError(f"No site name: {bundle.root / 'site.env'} has no FEDRAD_SITE; give --site NAME.")
    if not superlink:
        raise ValueError(f"No coordinator address: {bundle.root / 'site.env'} has no FEDRAD_SUPERLINK; "
                         "give --superlink HOST:PORT.")
    data_dir, work_dir = data_dir.resolve(), work_dir.resolve()
    if not (data_dir / "labels.csv").is_file():
        raise FileNotFoundError(f"{data_dir / 'labels.csv'} not found: --data must be this site's folder (DICOM "
                                "files + labels.csv with columns image,label,split).")
    parts = [toml_literal("site-name", site), toml_literal("data-dir", str(data_dir)),
             toml_literal("work-dir", str(work_dir))]
    if policy is not None:
        load_policy(policy)  # refuse a bad policy file now, by name, rather than at the first message
        parts.append(toml_literal("policy-file", str(Path(policy).resolve())))
    node_config = " ".join(parts)
    argv = [flower_binary("flower-supernode"), "--superlink", superlink,
            "--root-certificates", str(bundle.ca_cert.resolve()),
            "--auth-supernode-private-key", str(bundle.node_key.resolve()),
            "--node-config", node_config, "--port", str(port)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


def site_command(supernode: list[str], *, max_memory_mb: int = 0, poll_interval: float | None = None) -> list[str]:
    """The warm site daemon's command line: `fedrad.client.site_supervisor` around the SuperNode's.

    The supervisor runs the SuperNode with process isolation and one long-lived ClientApp
    process for the site (`fedrad.client.warm_clientapp`), restarted whenever it exits and
    recycled above `max_memory_mb`; `poll_interval` caps the SuperNode's idle wait
    (`fedrad.client.supernode_polling`; None keeps Flower's 3 s).
    """
    argv = [sys.executable, "-m", "fedrad.client.site_supervisor", "--max-memory-mb", str(int(max_memory_mb))]
    if poll_interval is not None:
        argv += ["--poll-interval", str(poll_interval)]
    return [*argv, "--", *supernode]


def daemon_env(work_dir: Path, threads: int | None = None) -> dict[str, str]:
    """The SuperNode's environment: Flower home under the work folder (unless set), optional CPU thread cap.

    `threads` caps PyTorch's threads in every ClientApp process (OMP_NUM_THREADS); useful
    when several sites share one machine, as in the local demo.
    """
    extra = {} if "FLWR_HOME" in os.environ else {"FLWR_HOME": str((work_dir / "flwr").resolve())}
    if threads is not None:
        extra["OMP_NUM_THREADS"] = str(threads)
    return flower_env(extra)
