"""Which fedrad this is. The coordinator and every site must run the same one.

The coordinator's shared weights, record names and run-config keys only mean the same
thing on both sides when both run the same code, so the coordinator puts its version in
every message (`fedrad.common.records.config_record`) and a site with another version
refuses the message before it reads anything, naming both versions.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrad")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+source"


class VersionMismatch(RuntimeError):
    """The coordinator runs another fedrad than this site."""


def check_same_version(coordinator: object) -> None:
    """Refuse a message from a coordinator that runs another fedrad version (or sends none)."""
    if coordinator != __version__:
        theirs = coordinator if coordinator is not None else "(none sent: a fedrad older than this check)"
        raise VersionMismatch(
            f"the coordinator runs fedrad {theirs} and this site runs fedrad {__version__}; "
            "install the same fedrad version at the coordinator and at every site"
        )
