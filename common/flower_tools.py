"""Flower's own programs (`flower-superlink`, `flower-supernode`, `flwr`), found and run the same way.

fedrad's deployment commands wrap these rather than re-implementing any of them: they only
choose the flags. Every child gets telemetry and the update check switched off, and the
binaries are taken from the environment fedrad runs in (next to this Python), so a
systemd unit or container needs no PATH set up.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
CHECKED_FLWR = "1.42.0"  # the Flower release whose internals fedrad's few adjustments were written against
OBJECT_RETRY_S = 0.02  # first wait before asking again for an object not at the SuperLink yet (Flower's: 1 s, doubling)


def quick_object_pulls(module: types.ModuleType, cap: float, **options: Any) -> bool:
    """Make `module`'s `pull_objects` ask again for a missing object after 20 ms (doubling up to `cap` s), not 1 s.

    Why: a message's header reaches the other side before its arrays. Flower 1.42 then pulls
    the arrays, and those not in yet make `pull_objects` wait 1 s, then 2 s, ... (not
    settable), while on a LAN they arrive within milliseconds. The coordinator's Grid and the
    SuperNode both pull this way; both take this one change. Only the waits change (plus
    `options`, e.g. `max_tries_per_object`). Applied once; False (nothing changed) on another
    Flower release or where the module has no `pull_objects`.
    """
    from flwr import __version__ as flwr_version

    pull = getattr(module, "pull_objects", None)
    if flwr_version != CHECKED_FLWR or pull is None:
        return False
    if not isinstance(pull, functools.partial):
        module.pull_objects = functools.partial(pull, initial_backoff=OBJECT_RETRY_S,  # type: ignore[attr-defined]
                                                backoff_cap=max(cap, OBJECT_RETRY_S), **options)
    return True


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment with telemetry and the update check off (not overridable).

    This interpreter's bin folder goes first on PATH: the SuperLink and SuperNode start
    their helpers (`flower-superexec`, `flwr-serverapp`, `flwr-clientapp`) by name.
    """
    env = dict(os.environ)
    env.update(extra or {})
    env.update(QUIET_ENV)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return env


def flower_binary(name: str) -> str:
    """Absolute path of a Flower program: beside this interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` is neither next to {sys.executable} nor on PATH; install fedrad's "
                                "dependencies (flwr) into this environment, e.g. `make venv`.")
    return found


def toml_literal(key: str, value: str) -> str:
    """`key='value'` for Flower's --node-config / --run-config (a TOML literal string: no escapes)."""
    if "'" in value or "\n" in value:
        raise ValueError(f"The value of {key} ({value!r}) contains a quote or a newline, which Flower's "
                         "key=value flags cannot carry; rename the folder.")
    return f"{key}='{value}'"


def show(argv: Sequence[str]) -> str:
    """A command line as a shell would read it (for logs and --dry-run)."""
    return shlex.join(argv)


def exec_flower(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Replace this process by the Flower program, so signals (systemd stop, Ctrl-C) reach it directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], list(argv), dict(env))
