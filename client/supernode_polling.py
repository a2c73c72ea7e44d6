"""The SuperNode's poll interval: `flower-supernode` with its idle wait shortened, for a LAN or loopback federation.

A Flower 1.42 SuperNode with no message asks the SuperLink again after a fixed 3 s
(`time.sleep(3)` in `flwr.supernode.start_client_internal`), and waits for its ClientApp's
reply in steps of 0.5 s; neither is a flag or an environment variable. A message therefore
waits 1.5 s on average (3 s at worst) at each site before anything runs. Then the SuperNode
fetches the message's arrays, which the SuperLink often does not hold yet when the header
arrives (the ServerApp pushes them after it): Flower retries after 1 s, then 2 s, ... —
measured, about 3 s of every train and evaluate message on loopback. This launcher runs
Flower's own `flower-supernode` entry point with the waits of that one module capped at
`--poll-interval` seconds and those retries starting at 20 ms (capped at the interval);
every other behaviour is Flower's.

Idle cost: one `PullMessages` request (signed with the node key, over TLS) per interval
per site instead of one per 3 s: 0.25 s is 4 requests a second per site (a few KB/s per
site; deploy/README.md) — fine on a LAN, worth a longer interval for hundreds of sites on
one SuperLink.

The patch is applied only to the Flower version it was written against (and only if the
waits it replaces are still there); otherwise it says so and Flower runs unchanged.

    python -m fedrad.client.supernode_polling --poll-interval 0.25 -- <flower-supernode arguments>
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
import types

from fedrad.common.flower_tools import CHECKED_FLWR, quick_object_pulls

log = logging.getLogger("fedrad.site")


def cap_waits(module: types.ModuleType, interval: float) -> bool:
    """Make `module.time.sleep(s)` sleep min(s, interval); False (nothing changed) where the module is not as known."""
    from flwr import __version__ as flwr_version

    if flwr_version != CHECKED_FLWR or "time.sleep(3)" not in inspect.getsource(module):
        log.warning("flwr %s: the SuperNode's poll interval is not settable here; keeping Flower's 3 s "
                    "(fedrad.client.supernode_polling knows flwr %s)", flwr_version, CHECKED_FLWR)
        return False
    capped = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    capped.sleep = lambda seconds: time.sleep(min(seconds, interval))
    module.time = capped  # type: ignore[attr-defined]
    quick_object_pulls(module, interval, max_tries_per_object=None)  # the message's arrays: ask again soon
    return True


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv[:1] != ["--poll-interval"]:
        sys.exit("usage: python -m fedrad.client.supernode_polling --poll-interval SECONDS -- "
                 "<flower-supernode arguments>")
    interval = float(argv[1])
    if not 0.01 <= interval <= 3.0:
        sys.exit(f"--poll-interval {interval}: give 0.01 to 3 seconds (Flower's own is 3)")
    rest = argv[argv.index("--") + 1:]
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap_waits(internal, interval)
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
