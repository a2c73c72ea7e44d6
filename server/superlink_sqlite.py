"""The SuperLink's SQLite: `flower-superlink` that waits longer for its database's write lock, and takes it less often.

A Flower 1.42 SuperLink keeps its state (nodes, runs, messages, their arrays) in one SQLite
file (`--database`, `fedrad coordinator --state`), opened with the pragmas of
`flwr.supercore.constant.SQLITE_PRAGMAS`: WAL journal (readers never wait for the writer)
and `busy_timeout = 5000`, i.e. a request that finds another connection writing waits at most
5 s for the lock, then fails with `sqlite3.OperationalError: database is locked` (HTTP 500 to
the caller). Neither is a flag or an environment variable. Measured: with 16 site daemons on
one overloaded 2-core machine, 4 of 16 train replies pushed at the same moment failed this way,
and a SuperNode does not push a failed reply again, so those sites were lost for the round
(BENCHMARKS.md, "Sixteen site daemons").

This launcher runs Flower's own `flower-superlink` entry point with only the busy timeout
changed (`--busy-timeout` seconds; fedrad's default 20 s). 20 s stays below the 30 s a
SuperNode's HTTP request waits for an answer (Flower's `ProtobufClient` timeout), so a push
that waits for the lock is still answered, not abandoned by the site. WAL stays on (checked).
Each pragma is set by Flower's connect hook (`flwr.supercore.sql_mixin._set_sqlite_pragmas`),
which reads the module's `SQLITE_PRAGMAS` at every new connection; that name is replaced.

It also runs the state's housekeeping less often. Flower 1.42 clears expired task claims
(`SqlCoreState._cleanup_expired_task_tokens`: two UPDATEs, a write transaction) at the start
of every run-status check, and every object a site or the coordinator pushes or pulls
checks the run's status first: one write transaction per object, all taking the one write
lock in turn. Profiled on a loopback deployment, that cleanup was about half of the
SuperLink's time in its object handlers (BENCHMARKS.md). Here it runs at most once every
`CLEANUP_EVERY_S` seconds (for the whole process): a task whose heartbeats stopped is
marked failed up to a second later; Flower's heartbeat timeouts are tens of seconds.

The patches are applied only to the Flower version they were written against, and only if
what they replace is as known; otherwise the launcher refuses to start and says so
(`fedrad coordinator --sqlite-busy-timeout 0` then runs Flower's own SuperLink unchanged).

    python -m fedrad.server.superlink_sqlite --busy-timeout 20 -- <flower-superlink arguments>
"""

from __future__ import annotations

import inspect
import sys
import time
import types
from collections.abc import Callable

from fedrad.common.flower_tools import CHECKED_FLWR

FLOWER_BUSY_TIMEOUT_MS = "5000"
DEFAULT_BUSY_TIMEOUT_S = 20.0
MAX_BUSY_TIMEOUT_S = 600.0
CLEANUP_EVERY_S = 1.0  # the expired-task-claim housekeeping runs at most this often (Flower: at every status check)


class UnknownFlower(RuntimeError):
    """The installed Flower is not the one whose SQLite pragmas this launcher knows."""


def set_busy_timeout(module: types.ModuleType, seconds: float) -> tuple[tuple[str, str], ...]:
    """Make every new SuperLink database connection wait up to `seconds` for a lock; the new pragma list.

    `module` is `flwr.supercore.sql_mixin`. Raises `UnknownFlower` (nothing changed) unless
    it is flwr 1.42.0's, with busy_timeout 5000 ms and the WAL journal in its pragmas and a
    connect hook that reads them from the module at connection time.
    """
    from flwr import __version__ as flwr_version

    pragmas = getattr(module, "SQLITE_PRAGMAS", None)
    hook = getattr(module, "_set_sqlite_pragmas", None)
    known = (flwr_version == CHECKED_FLWR and isinstance(pragmas, tuple) and hook is not None
             and dict(pragmas).get("busy_timeout") == FLOWER_BUSY_TIMEOUT_MS
             and str(dict(pragmas).get("journal_mode", "")).upper() == "WAL"
             and "SQLITE_PRAGMAS" in inspect.getsource(hook))
    if not known:
        raise UnknownFlower(f"flwr {flwr_version}: fedrad.server.superlink_sqlite knows the SuperLink's SQLite "
                            f"pragmas of flwr {CHECKED_FLWR} only, and these are not those; start the coordinator "
                            "with `--sqlite-busy-timeout 0` to run Flower's SuperLink unchanged (its 5 s busy "
                            "timeout), or install the pinned flwr (constraints.txt)")
    if not 0 < seconds <= MAX_BUSY_TIMEOUT_S:
        raise ValueError(f"busy timeout {seconds} s: give more than 0 and at most {MAX_BUSY_TIMEOUT_S:.0f} seconds")
    patched = tuple((name, str(int(seconds * 1000)) if name == "busy_timeout" else value) for name, value in pragmas)
    module.SQLITE_PRAGMAS = patched  # type: ignore[attr-defined]
    return patched


def throttle_cleanup(cls: type, every_s: float = CLEANUP_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
    """Make `cls._cleanup_expired_task_tokens` run at most once every `every_s` seconds (one clock per process).

    `cls` is flwr 1.42's `SqlCoreState`; raises `UnknownFlower` (nothing changed) if the
    method is not there. Two threads passing at once may both clean: harmless.
    """
    original = getattr(cls, "_cleanup_expired_task_tokens", None)
    if original is None:
        raise UnknownFlower("this Flower's SqlCoreState has no _cleanup_expired_task_tokens to throttle")
    if getattr(original, "fedrad_throttled", False):  # already throttled (a second call in this process)
        return
    last = [float("-inf")]

    def cleanup(self) -> None:  # noqa: ANN001 - Flower's state
        now = clock()
        if now - last[0] >= every_s:
            last[0] = now
            original(self)

    cleanup.fedrad_throttled = True  # type: ignore[attr-defined]
    cls._cleanup_expired_task_tokens = cleanup  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv[:1] != ["--busy-timeout"] or argv.index("--") != 2:
        sys.exit("usage: python -m fedrad.server.superlink_sqlite --busy-timeout SECONDS -- "
                 "<flower-superlink arguments>")
    try:
        seconds = float(argv[1])
    except ValueError:
        sys.exit(f"--busy-timeout {argv[1]!r}: give a number of seconds")
    rest = argv[3:]
    from flwr.supercore import sql_mixin
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.superlink.cli import flower_superlink

    try:
        set_busy_timeout(sql_mixin, seconds)
        throttle_cleanup(SqlCoreState)
    except (UnknownFlower, ValueError) as err:
        sys.exit(str(err))
    print(f"fedrad: SuperLink SQLite busy_timeout {seconds:g} s (Flower's own: 5 s), WAL journal, expired task claims "
          f"cleared at most every {CLEANUP_EVERY_S:g} s", file=sys.stderr, flush=True)
    sys.argv = ["flower-superlink", *rest]
    flower_superlink()


if __name__ == "__main__":
    main()
