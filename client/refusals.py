"""Every failure at a site becomes a coded reply: a fixed code and a random incident id, never text.

Flower would send an exception's text to the coordinator (`Error.reason = str(ex)`), and a
site's exception texts hold paths, file names and, with a header-less labels.csv, a patient's
file name and label. So each handler runs `guarded`: an exception becomes
`Error(code, "<code> incident=<id>")` (`fedrad.common.codes`), and the text with its
traceback goes to `<work-dir>/incidents.log` at the site, under the same id. The egress log
records the refusal too.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message

from fedrad.client.labels import SiteDataError
from fedrad.client.policy import PolicyError, PolicyRefused, SmallCount
from fedrad.common.codes import CODES, new_incident, reason
from fedrad.common.dicom import DicomReadError
from fedrad.common.egress import EgressError
from fedrad.common.version import VersionMismatch

INCIDENTS = "incidents.log"
log = logging.getLogger("fedrad.site")
Handler = Callable[[Message, Context], Message]


def code_of(err: BaseException) -> str:
    """The fixed code of an exception (anything unforeseen is `internal`)."""
    for kind, name in ((VersionMismatch, "version-mismatch"), (PolicyRefused, "policy-refused"),
                       (PolicyError, "policy-refused"), (SmallCount, "small-count"), (EgressError, "egress-refused"),
                       (SiteDataError, "site-data"), (DicomReadError, "site-data")):
        if isinstance(err, kind):
            return name
    return "internal"


def write_incident(work: Path | None, incident: str, code: str, err: BaseException) -> None:
    """The full text, kept at the site: in its work folder when known, else in its own log."""
    text = "".join(traceback.format_exception(err))
    if work is not None:
        try:
            work.mkdir(parents=True, exist_ok=True)
            with open(work / INCIDENTS, "a", encoding="utf-8") as handle:
                handle.write(f"--- incident {incident} ({code})\n{text}\n")
            log.error("refused with %s, incident %s (details: %s)", code, incident, work / INCIDENTS)
            return
        except OSError:
            pass
    log.error("refused with %s, incident %s: %s", code, incident, text)


def refusal(err: BaseException, work: Path | None) -> tuple[str, str]:
    """(code, incident id) of a failure, its text written to the site's incidents.log under that id."""
    code, incident = code_of(err), new_incident()
    write_incident(work, incident, code, err)
    return code, incident


def guarded(kind: str, where: Callable[[Message, Context], tuple[Path | None, Callable[[dict], None] | None]]
            ) -> Callable[[Handler], Handler]:
    """Wrap a handler so that any exception becomes a coded reply.

    `where(msg, context)` names the site's work folder and a function that writes a line to
    its egress log, as far as they can be known (either may be None).
    """
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as err:  # noqa: BLE001 - every failure becomes a code; the text stays here
                try:
                    work, note = where(msg, context)
                except Exception:  # noqa: BLE001 - the config itself may be what failed
                    work, note = None, None
                code, incident = refusal(err, work)
                if note is not None:
                    note({"code": code, "incident": incident})
                return Message(Error(CODES[code], reason(code, incident)), reply_to=msg)
        return run
    return wrap
