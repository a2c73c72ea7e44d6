"""Flower's own programs (`flower-superlink`, `flower-supernode`, `flwr`), found and run the same way.

fedrad's deployment commands wrap these rather than re-implementing any of them: they only
choose the flags. Every child gets telemetry and the update check switched off, and the
binaries are taken from the environment fedrad runs in (next to this Python), so a
systemd unit or container needs no PATH set up.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


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
