"""One buffer per message on the wire: a message's records packed into a single array for transport.

Why: Flower 1.42 moves every record of a message, every Array in it and every 5 MB chunk of
one as an object of its own: one HTTP request per object per hop, and at the SuperLink
several SQLite write transactions for each (store, claim, traffic count, run-status check)
in one Python process that every site and the coordinator wait on. A train message with its
9 shared arrays was 22 objects, a train reply with the BN statistics of 14 layers and the
evaluation that rides in it about 60. Measured on loopback, that per-object cost, not the
bytes, was most of a deployed round (BENCHMARKS.md). Packed, a message's content is one
ArrayRecord of two arrays: the bytes of every array, and a JSON layout that names each
record, its arrays (dtype, shape) and its config and metric values; plus the chunks of the
bytes. About 8 objects a message, whatever it holds.

The packing is lossless (the same bytes sliced back into the same dtypes and shapes; values
through JSON, which gives floats back exactly, NaN included, and bytes as base64) and
happens at the edge only: the coordinator packs what it sends and unpacks what it receives
(`fedrad.server.rounds`); a site unpacks a message on arrival and packs its reply after its
egress log has recorded it (`fedrad.client.app`). Everything between (the whitelist, the
egress log, the strategy's checks, aggregation) sees the records as before, and the
Simulation Engine's results are the same to the bit. Content that is not packed passes
through unpacking unchanged.

Unpacking trusts nothing: the layout must be JSON of known record kinds, array rows with
known dtypes, unique names and sizes that add up to the buffer exactly, and values of the
types Flower's records hold; otherwise `PackingError` says what is wrong, and the receiver
treats the message as malformed.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

WIRE = "fedrad.wire"  # the one record of a packed message's content
PACKED = "packed"  # in WIRE, uint8, 1-D: every array's bytes in C order, one after another
LAYOUT = "layout"  # in WIRE, uint8, 1-D: UTF-8 JSON [[record, kind, arrays | values], ...] in the same order
KINDS = {"arrays": ArrayRecord, "config": ConfigRecord, "metrics": MetricRecord}
DTYPES = frozenset({"<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1"})  # little-endian numeric only
MAX_LAYOUT_BYTES = 4 << 20  # a layout of 4 MB would be ~40,000 arrays or values: no message of ours comes near


class PackingError(ValueError):
    """A packed message whose layout does not describe its buffer, or holds what no record holds."""


def is_packed(content: RecordDict) -> bool:
    return WIRE in content


def pack_content(content: RecordDict) -> RecordDict:
    """The content as one record of two arrays (the bytes, the layout).

    Returned as it is: empty content, packed content, and content with an array of a dtype
    outside `DTYPES` (none of fedrad's; Flower then sends it as it would have).
    """
    if not len(content) or is_packed(content):
        return content
    layout, chunks = [], []
    for name, record in content.items():
        kind = next(k for k, cls in KINDS.items() if isinstance(record, cls))
        if kind != "arrays":
            layout.append([name, kind, {key: _encoded(value) for key, value in record.items()}])
            continue
        rows = []
        for key, array in record.items():
            a = np.asarray(array.numpy())
            if a.dtype.str not in DTYPES:  # not ours to pack: it travels as Flower sends it
                return content
            rows.append([key, a.dtype.str, list(a.shape)])
            chunks.append(a.tobytes())  # C order
        layout.append([name, kind, rows])
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    text = np.frombuffer(json.dumps(layout, separators=(",", ":")).encode(), dtype=np.uint8)
    return RecordDict({WIRE: ArrayRecord({PACKED: Array(data), LAYOUT: Array(text)})})


def pack_contents(contents: Sequence[RecordDict]) -> list[RecordDict]:
    """`pack_content` of each, but once per distinct content: equal ones share one packed content.

    Why: a round's messages carry the one global model (the same ArrayRecord object) to every
    site; packed one by one, 100 sites hold 100 copies of its bytes at once (measured: +0.7 GB
    in the coordinator at 100 virtual sites). Contents are equal here when they hold the same
    ArrayRecord objects and equal config and metric values under the same names.
    """
    packed: dict[tuple, RecordDict] = {}
    out = []
    for content in contents:
        key = tuple((name, id(record)) if isinstance(record, ArrayRecord) else
                    (name, type(record).__name__, repr(list(record.items()))) for name, record in content.items())
        if key not in packed:
            packed[key] = pack_content(content)
        out.append(packed[key])
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """The records a packed content holds, in their order; content that is not packed is returned as it is."""
    if not is_packed(content):
        return content
    wire = content[WIRE]
    if len(content) != 1 or not isinstance(wire, ArrayRecord) or set(wire) != {PACKED, LAYOUT}:
        raise PackingError(f"packed content is one ArrayRecord {WIRE!r} of {PACKED!r} and {LAYOUT!r} only")
    data, text = wire[PACKED].numpy(), wire[LAYOUT].numpy()
    for name, a in ((PACKED, data), (LAYOUT, text)):
        if a.dtype != np.uint8 or a.ndim != 1:
            raise PackingError(f"{name!r} must be a 1-D uint8 array, not {a.dtype} {a.shape}")
    if text.nbytes > MAX_LAYOUT_BYTES:
        raise PackingError(f"the layout is {text.nbytes} bytes (at most {MAX_LAYOUT_BYTES})")
    try:
        layout = json.loads(text.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackingError(f"the layout is not JSON: {err}") from None
    if not isinstance(layout, list) or not layout:
        raise PackingError("the layout must be a non-empty list of [record, kind, contents] rows")
    records: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {}
    offset = 0
    for row in layout:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and row[1] in KINDS):
            raise PackingError(f"layout row {str(row)[:80]!r} is not [record, kind, contents]")
        name, kind, body = row
        if name in records:
            raise PackingError(f"record {name[:80]!r} appears twice")
        try:
            if kind == "arrays":
                records[name], offset = _arrays(body, data, offset)
            else:
                records[name] = _values(kind, body)
        except PackingError as err:
            raise PackingError(f"record {name[:80]!r}: {err}") from None
    if offset != data.nbytes:
        raise PackingError(f"the layout describes {offset} bytes, the buffer holds {data.nbytes}")
    return RecordDict(records)


def _arrays(rows: object, data: np.ndarray, offset: int) -> tuple[ArrayRecord, int]:
    """One ArrayRecord sliced from `data` at `offset` (views, no copy), and the offset after it."""
    if not isinstance(rows, list):
        raise PackingError("its arrays must be a list of [name, dtype, shape] rows")
    out: dict[str, Array] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], str)
                and isinstance(row[2], list)):
            raise PackingError(f"array row {str(row)[:80]!r} is not [name, dtype, shape]")
        name, dtype, shape = row
        if name in out:
            raise PackingError(f"array name {name[:80]!r} appears twice")
        if dtype not in DTYPES:
            raise PackingError(f"array {name[:80]!r}: dtype {dtype[:20]!r} is not one of {sorted(DTYPES)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape) or len(shape) > 8:
            raise PackingError(f"array {name[:80]!r}: shape {str(shape)[:80]} is not up to 8 sizes >= 0")
        count, size = math.prod(shape), np.dtype(dtype).itemsize
        if offset + count * size > data.nbytes:
            raise PackingError(f"the layout describes more than the buffer's {data.nbytes} bytes")
        array = np.frombuffer(data, dtype=np.dtype(dtype), count=count, offset=offset).reshape(shape)
        offset += count * size
        out[name] = Array(array)
    return ArrayRecord(out), offset


def _encoded(value: object) -> object:
    """A config or metric value as JSON holds it: bytes (alone or in a list) as {"b64": ...}."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_encoded(v) for v in value]
    return value


def _decoded(value: object) -> object:
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise PackingError("a value is an object other than {\"b64\": ...}")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise PackingError("a bytes value is not base64") from None
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def _values(kind: str, body: object) -> ConfigRecord | MetricRecord:
    if not isinstance(body, dict):
        raise PackingError("its values must be a JSON object")
    try:
        return KINDS[kind]({key: _decoded(value) for key, value in body.items()})
    except PackingError:
        raise
    except (TypeError, ValueError) as err:  # Flower's own type checks of a record's values
        raise PackingError(f"a value Flower's {KINDS[kind].__name__} does not hold: {str(err)[:120]}") from None
