"""The fixed reason codes a site may send instead of text: for a failed message, or a withheld record.

An exception's text can carry anything: a file name, a patient number in a header-less
labels.csv, an absolute path. So no text ever leaves a site. A failed message carries one
of these codes and a random incident id (`Error(code, "<name> incident=<id>")`); the full
text stays in the site's own log under that id. A record the site chose not to send is
named in the reply's `withheld` record with one of these codes too. The coordinator keeps
only codes it knows: any other error text (a crash Flower reports itself) is recorded as
`internal`, never copied.
"""

from __future__ import annotations

import re
import secrets

# name -> Flower Error code (ints >= 100: Flower's own codes are 0..8)
CODES: dict[str, int] = {
    "site-data": 100,  # the site cannot read its data (labels.csv missing or malformed, no images)
    "policy-refused": 101,  # the coordinator asked for something outside the site's policy
    "version-mismatch": 102,  # the coordinator runs another fedrad version
    "egress-refused": 103,  # the reply broke the site's own whitelist and was not sent
    "small-count": 104,  # too few images behind an aggregate (the policy's min-count)
    "internal": 105,  # anything else; the site's log has the text under the incident id
}
NAMES = {code: name for name, code in CODES.items()}
_REASON = re.compile(r"^(?P<name>[a-z-]+) incident=(?P<incident>[0-9a-f]{12})$")


def new_incident() -> str:
    """A random id that links a coded reply to the full text in the site's own log."""
    return secrets.token_hex(6)


def reason(name: str, incident: str) -> str:
    """The only text a failed reply carries."""
    if name not in CODES:
        raise ValueError(f"unknown reason code {name!r}; known: {sorted(CODES)}")
    return f"{name} incident={incident}"


def parse(code: int, text: str | None) -> tuple[str, str | None]:
    """(code name, incident id) of a failed reply; text that is not ours becomes ('internal', None)."""
    match = _REASON.match(text or "")
    if match and match["name"] in CODES and CODES[match["name"]] == code:
        return match["name"], match["incident"]
    return "internal", None
