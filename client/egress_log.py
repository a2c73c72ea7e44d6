"""The site's egress audit log: one JSON line per message that leaves, in its own work folder.

`<work-dir>/egress.jsonl` records, for every reply: the time, run, round and message type,
the policy hash it was sent under, and each record and key with its shape, dtype, bytes and
SHA-256 (scalars: type and the hash of their JSON value). A coded refusal is logged with its
code and incident id. The hashes are of exactly the bytes Flower serialises, so the site's
data-protection officer can check, key by key, that the coordinator received what the log
says and nothing else. `fedrad audit --work DIR` prints it, one table per run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedrad.common.records import WITHHELD, payload_bytes

LOG_FILE = "egress.jsonl"


def value_hash(value: Any) -> str:
    """SHA-256 of a scalar or config value as JSON (what both sides can recompute)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def describe_content(content: RecordDict) -> dict[str, dict[str, dict[str, Any]]]:
    """Every record and key of a message: shape, dtype, bytes and SHA-256 (arrays), or type and hash (values)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {key: {"shape": list(a.shape), "dtype": a.dtype, "bytes": len(a.data),
                               "sha256": hashlib.sha256(a.data).hexdigest()} for key, a in record.items()}
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            out[name] = {key: {"type": type(v).__name__, "sha256": value_hash(v)} for key, v in record.items()}
            if name == WITHHELD:  # the reason codes are not private: keep them readable
                for key, v in record.items():
                    out[name][key]["value"] = v
        else:
            out[name] = {"?": {"type": type(record).__name__}}
    return out


def append(work: Path, *, run: int, server_round: int | None, kind: str, policy_sha256: str,
           content: RecordDict | None = None, refused: dict[str, str] | None = None) -> None:
    """Add one line for an outgoing message (its content) or a coded refusal ({"code", "incident"})."""
    entry: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": run, "round": server_round,
                             "type": kind, "policy_sha256": policy_sha256}
    if content is not None:
        entry["bytes"] = payload_bytes(content)
        entry["records"] = describe_content(content)
    if refused is not None:
        entry["refused"] = refused
    work.mkdir(parents=True, exist_ok=True)
    with open(work / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def read(work: Path) -> list[dict[str, Any]]:
    """Every line of the site's audit log (a missing log: none)."""
    path = Path(work) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def by_run(entries: Iterable[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The log's lines grouped by run, in order."""
    runs: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        runs.setdefault(entry["run"], []).append(entry)
    return runs


def row(entry: dict[str, Any]) -> list[str]:
    """One table row: round, type, what left (record: keys), withheld, bytes, policy hash."""
    records = entry.get("records", {})
    sent = ", ".join(f"{name} ({len(keys)})" for name, keys in records.items() if name != WITHHELD)
    withheld = ", ".join(f"{k}: {v.get('value')}" for k, v in records.get(WITHHELD, {}).items())
    if "refused" in entry:
        sent = f"refused: {entry['refused'].get('code')} (incident {entry['refused'].get('incident')})"
    return [str(entry.get("round", "")), entry["type"], sent or "–", withheld or "–", f"{entry.get('bytes', 0):,}",
            entry["policy_sha256"][:12]]
