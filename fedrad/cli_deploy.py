"""The deployment subcommands of `fedrad`: provision, coordinator, register, site, policy, audit, submit.

    fedrad provision --certs certs --name coord.example.org --site hospital-a --site hospital-b
    fedrad coordinator --certs certs --state /var/lib/fedrad --host 0.0.0.0
    fedrad register --certs certs
    fedrad site --bundle certs/sites/hospital-a --data /srv/data --work /var/lib/fedrad-site
    fedrad submit --certs certs --out /var/lib/fedrad/runs/exp1 --rounds 10

Each parses its flags and calls one function of `fedrad.server.provision`, `fedrad.server.coordinator`
or `fedrad.client.daemon`; the daemons replace this process (exec) by Flower's own program (the
coordinator) or by the site supervisor (`fedrad.client.site_supervisor`), so systemd and containers
signal them directly. deploy/README.md is the operator's guide.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
from pathlib import Path

log = logging.getLogger("fedrad")
FMT = argparse.RawDescriptionHelpFormatter


def cmd_provision(args: argparse.Namespace) -> int:
    from fedrad.server.provision import provision

    result = provision(args.certs, sites=args.site, names=args.name, port=args.port, rotate=args.rotate,
                       renew_coordinator=args.renew_coordinator, force=args.force)
    for item, action in result.actions:
        print(f"{action:>10}  {item}")
    print(f"\nCoordinator files: {args.certs / 'coordinator'} · site bundles: {args.certs / 'sites'}/<site> "
          f"(hand each to its site only) · keep {args.certs / 'ca' / 'ca.key'} offline.")
    if any(a == "rotated" for _, a in result.actions):
        print("A key was rotated: run `fedrad register` so the coordinator admits the new key and drops the old one.")
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedrad.common.flower_tools import exec_flower, show
    from fedrad.server.coordinator import daemon_env, superlink_command
    from fedrad.server.provision import CertsLayout

    argv = superlink_command(CertsLayout(args.certs), args.state, host=args.host, port=args.port,
                             busy_timeout_s=args.sqlite_busy_timeout)
    if args.dry_run:
        print(show(argv))
        return 0
    args.state.mkdir(parents=True, exist_ok=True)
    log.info("starting the coordinator (SuperLink, TLS + node authentication) on %s:%d", args.host, args.port)
    exec_flower(argv, daemon_env(args.state))
    return 0  # not reached


def cmd_register(args: argparse.Namespace) -> int:
    from fedrad.server.coordinator import register_sites, write_connection
    from fedrad.server.provision import CertsLayout

    layout = CertsLayout(args.certs)
    write_connection(args.superlink, layout.coordinator_ca)
    for reg in register_sites(layout, args.site):
        print(f"{reg.site}: {reg.action}" + (f" (node {reg.node_id})" if reg.node_id is not None else ""))
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    from fedrad.client.daemon import daemon_env, site_command, supernode_command
    from fedrad.common.bundle import SiteBundle
    from fedrad.common.flower_tools import exec_flower, show

    argv = supernode_command(SiteBundle(args.bundle), args.data, args.work, superlink=args.superlink, site=args.site,
                             port=args.port, max_retries=args.max_retries, policy=args.policy)
    if not args.cold:  # the SuperNode plus the site's warm ClientApp process, supervised
        argv = site_command(argv, max_memory_mb=args.max_memory_mb, poll_interval=args.poll_interval)
    if args.dry_run:
        print(show(argv))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    log.info("starting the site daemon (SuperNode) for %s", args.data)
    exec_flower(argv, daemon_env(args.work, args.threads))
    return 0  # not reached


def cmd_policy(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedrad.client.policy import load_policy, what_travels

    policy = load_policy(args.file)
    console = Console()
    console.print(f"site policy: {policy.source} · sha256 {policy.sha256()}", soft_wrap=True)
    for key, value in policy.as_dict().items():
        console.print(f"  {key} = {value}")
    console.print("")
    console.print(what_travels(policy), soft_wrap=True, markup=False)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedrad.client import egress_log

    entries = egress_log.read(args.work)
    if not entries:
        raise FileNotFoundError(f"{args.work / egress_log.LOG_FILE} not found or empty: nothing has left this site "
                                "yet (or --work is not the site's work folder)")
    console = Console()
    for run, lines in egress_log.by_run(entries).items():
        total = sum(e.get("bytes", 0) for e in lines)
        table = Table(title=f"run {run} · {len(lines)} messages · {total:,} bytes left the site")
        for column in ("round", "type", "what left (record: keys)", "withheld", "bytes", "policy"):
            table.add_column(column, justify="right" if column in ("round", "bytes") else "left")
        for entry in lines:
            table.add_row(*egress_log.row(entry))
        console.print(table)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from fedrad.common.flower_tools import flower_env, show
    from fedrad.server.coordinator import submit_command, write_connection
    from fedrad.server.provision import CertsLayout

    write_connection(args.superlink, CertsLayout(args.certs).coordinator_ca)
    argv = submit_command(args.out, overrides=args.run_config, rounds=args.rounds, stream=args.stream,
                          **({"app_dir": args.app} if args.app is not None else {}))
    log.info("submitting: %s", show(argv))
    return subprocess.run(argv, env=flower_env(), check=False).returncode


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    """Add provision / coordinator / register / site / submit to the `fedrad` parser."""
    p = sub.add_parser("provision", formatter_class=FMT,
                       help="make the federation's CA, the coordinator's TLS certificate and one key bundle per site",
                       description="Create (or extend) a certificate folder: a private CA, the coordinator's TLS "
                                   "certificate with the names sites dial, and per site an EC P-384 node key "
                                   "(OpenSSH format) in a bundle for that site alone. Private keys are 0600. "
                                   "Existing keys are kept; only --rotate/--renew-coordinator/--force replace any.",
                       epilog="examples:\n"
                              "  fedrad provision --certs certs --name coord.example.org --site hospital-a "
                              "--site hospital-b\n"
                              "  fedrad provision --certs certs --site hospital-c        # add a site\n"
                              "  fedrad provision --certs certs --rotate hospital-a      # new key for one site")
    p.add_argument("--certs", type=Path, required=True, help="the certificate folder (created if absent)")
    p.add_argument("--site", action="append", default=[], metavar="NAME", help="a site to provision (repeatable)")
    p.add_argument("--name", action="append", default=[], metavar="HOST",
                   help="a DNS name or IP the sites use to reach the coordinator (repeatable; localhost and "
                        "127.0.0.1 are always included)")
    p.add_argument("--port", type=int, default=8000, help="coordinator port written into the bundles (default 8000)")
    p.add_argument("--rotate", action="append", default=[], metavar="SITE", help="replace this site's key pair")
    p.add_argument("--renew-coordinator", action="store_true", help="re-issue the coordinator's TLS certificate")
    p.add_argument("--force", action="store_true", help="start over: a new CA, certificate and every site key")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("coordinator", formatter_class=FMT, help="run the coordinator (Flower SuperLink with TLS and "
                                                                "node authentication)",
                       description="Start flower-superlink with the provisioned TLS certificate, node authentication "
                                   "on, runtime dependency installation off and its state (registered sites, runs) "
                                   "in STATE/superlink.db. Runs in the foreground until stopped.",
                       epilog="examples:\n  fedrad coordinator --certs certs --state /var/lib/fedrad --host 0.0.0.0\n"
                              "  fedrad coordinator --certs certs --state /var/lib/fedrad --sqlite-busy-timeout 0   # Flower's 5 s")
    p.add_argument("--certs", type=Path, required=True, help="the folder `fedrad provision` made")
    p.add_argument("--state", type=Path, required=True, help="state folder (SuperLink database, Flower home)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for remote sites)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--sqlite-busy-timeout", type=float, default=20.0, metavar="SECONDS",
                   help="how long a request waits for the state database's write lock before failing (default 20; "
                        "Flower's own is 5 s, too short for many sites replying at once; 0 runs Flower's SuperLink "
                        "unchanged; see deploy/README.md)")
    p.add_argument("--dry-run", action="store_true", help="print the flower-superlink command instead of running it")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("register", formatter_class=FMT, help="admit the provisioned sites' keys at the coordinator",
                       description="Register every site's public key (CERTS/site-keys/*.pub) with the running "
                                   "coordinator via `flwr supernode register`. Idempotent; a rotated key replaces "
                                   "the site's old registration. Writes the `fedrad` connection to "
                                   "$FLWR_HOME/config.toml.",
                       epilog="examples:\n  fedrad register --certs certs\n"
                              "  fedrad register --certs certs --site hospital-c --superlink 127.0.0.1:8000")
    p.add_argument("--certs", type=Path, required=True, help="the folder `fedrad provision` made")
    p.add_argument("--superlink", default="127.0.0.1:8000", help="the coordinator's address (default 127.0.0.1:8000)")
    p.add_argument("--site", action="append", default=[], metavar="NAME", help="only these sites (default: all)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("site", formatter_class=FMT, help="run a hospital's site daemon (Flower SuperNode)",
                       description="Start flower-supernode from the site's bundle: TLS trusting the federation CA, "
                                   "node authentication with the site key, the site's data folder and work folder "
                                   "for the ClientApp, and beside it the site's long-lived ClientApp process "
                                   "(--cold: Flower's process per message). Runs in the foreground and reconnects "
                                   "until stopped.",
                       epilog="examples:\n  fedrad site --bundle /etc/fedrad/bundle --data /srv/fedrad/data "
                              "--work /var/lib/fedrad-site\n"
                              "  fedrad site --bundle b --data d --work w --poll-interval 0.25   # LAN / loopback")
    p.add_argument("--bundle", type=Path, required=True, help="this site's bundle folder (from `fedrad provision`)")
    p.add_argument("--data", type=Path, required=True, help="the site folder: DICOM files + labels.csv")
    p.add_argument("--work", type=Path, required=True, help="the site's own state folder (BN per round, summaries)")
    p.add_argument("--superlink", default=None, help="coordinator HOST:PORT (default: FEDRAD_SUPERLINK in site.env)")
    p.add_argument("--site", default=None, help="site name (default: FEDRAD_SITE in site.env)")
    p.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's own API (unique per host)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per training process (default: all)")
    p.add_argument("--max-retries", type=int, default=None, help="give up after this many failed connection tries "
                                                                 "(default: retry forever)")
    p.add_argument("--policy", type=Path, default=None,
                   help="the site's policy (TOML): what it sends and takes part in (default: site-policy.toml in "
                        "--data if present, else the documented defaults; see `fedrad policy`)")
    p.add_argument("--max-memory-mb", type=int, default=4096,
                   help="the site's warm ClientApp process starts afresh after a message that leaves it above this "
                        "resident memory (default 4096; 0: no bound)")
    p.add_argument("--poll-interval", type=float, default=None,
                   help="seconds the SuperNode waits between asking for messages (default: Flower's 3; 0.25 suits a "
                        "LAN or loopback; see deploy/README.md for the idle traffic)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--warm", action="store_true",
                      help="one long-lived ClientApp process per site, supervised (the default; --max-memory-mb "
                           "bounds it): imports, images and caches stay in memory between messages")
    mode.add_argument("--cold", action="store_true",
                      help="Flower's own mode instead: a fresh ClientApp process per message (slower: ~2 s of imports "
                           "and reloads per message; see deploy/README.md)")
    p.add_argument("--dry-run", action="store_true", help="print the site daemon's command instead of running it")
    p.set_defaults(func=cmd_site)

    p = sub.add_parser("policy", formatter_class=FMT, help="show a site policy: what the site will send",
                       description="Read a site policy file (or the defaults), check it, and print every setting, "
                                   "its SHA-256 (written with every line of the site's egress log) and the table of "
                                   "what travels under it.",
                       epilog="examples:\n  fedrad policy                                  # the defaults\n"
                              "  fedrad policy --file /etc/fedrad/site-policy.toml")
    p.add_argument("--file", type=Path, default=None, help="the policy file (default: none, the defaults)")
    p.set_defaults(func=cmd_policy)

    p = sub.add_parser("audit", formatter_class=FMT, help="show what left a site: its egress log, per run",
                       description="Print the site's egress log (WORK/egress.jsonl) as one table per run: per "
                                   "message, the records and keys that left (with their bytes), what the site "
                                   "withheld and why, refusals by code, and the hash of the policy in force. "
                                   "Every key's SHA-256 is in the log to check against what the coordinator got.",
                       epilog="example:\n  fedrad audit --work /var/lib/fedrad-site")
    p.add_argument("--work", type=Path, required=True, help="the site's work folder (`fedrad site --work`)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("submit", formatter_class=FMT, help="start a training run on the deployed federation",
                       description="`flwr run` of this project on the coordinator. OUT (a path on the coordinator) "
                                   "receives the report and a checkpoint after every round; submitting again with "
                                   "the same OUT and run config resumes after the last finished round.",
                       epilog="examples:\n  fedrad submit --certs certs --out /var/lib/fedrad/runs/exp1 --rounds 10\n"
                              "  fedrad submit --certs certs --out runs/lp --run-config \"freeze-blocks=17\" --stream")
    p.add_argument("--certs", type=Path, required=True, help="the folder `fedrad provision` made (for the CA)")
    p.add_argument("--out", type=Path, required=True, help="the run's report and checkpoint folder, on the coordinator")
    p.add_argument("--superlink", default="127.0.0.1:8000", help="the coordinator's address (default 127.0.0.1:8000)")
    p.add_argument("--rounds", type=int, default=None, help="number of rounds (run-config num-server-rounds)")
    p.add_argument("--run-config", action="append", default=[], metavar="\"k=v ...\"",
                   help="override [tool.flwr.app.config] keys")
    p.add_argument("--stream", action="store_true", help="stay attached and stream the run's log until it ends")
    p.add_argument("--app", type=Path, default=None, help="the Flower app folder to run (default: this fedrad project)")
    p.set_defaults(func=cmd_submit)
