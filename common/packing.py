"""One buffer per record on the wire: an ArrayRecord's arrays packed into a single array for transport.

Why: Flower 1.42 moves every Array of a message (and every 5 MB chunk of one) as an object
of its own: one HTTP request per object per hop, and at the SuperLink several SQLite write
transactions for each (store, claim, traffic count, run-status check). A train message with
its 9 shared arrays is 22 objects, a train reply with the BN statistics of 14 layers about
55. Measured on loopback, that per-object cost, not the bytes, was most of a deployed round
(BENCHMARKS.md). Packed, an ArrayRecord is two arrays (the bytes, and a small JSON layout)
plus the chunks of the bytes.

The packing is lossless (the same bytes, sliced back into the same dtypes and shapes) and
happens at the edge only: the coordinator packs what it sends and unpacks what it receives
(`fedrad.server.rounds`); a site unpacks a message on arrival and packs its reply after its
egress log has recorded it (`fedrad.client.app`). Everything between (the whitelist, the
egress log, the strategy's checks, aggregation) sees the records as before, and the
Simulation Engine's results are the same to the bit. A record that is not packed passes
through unpacking unchanged, so small records (and an older peer's) still read.

Unpacking trusts nothing: the layout must be JSON of [name, dtype, shape] rows with known
dtypes, unique names and sizes that add up to the buffer exactly; otherwise `PackingError`
says what is wrong, and the receiver treats the message as malformed.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

PACKED = "fedrad.packed"  # uint8, 1-D: the arrays' bytes in C order, one after another
LAYOUT = "fedrad.layout"  # uint8, 1-D: UTF-8 JSON [[name, dtype, shape], ...] in the same order
DTYPES = frozenset({"<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1"})  # little-endian numeric only
MIN_ARRAYS = 2  # a record of one array gains nothing from packing
MAX_LAYOUT_BYTES = 1 << 20  # a layout of 1 MB would be ~10,000 arrays: no model of ours comes near


class PackingError(ValueError):
    """A packed record whose layout does not describe its buffer."""


def is_packed(record: ArrayRecord) -> bool:
    return PACKED in record or LAYOUT in record


def pack(record: ArrayRecord) -> ArrayRecord:
    """The record as one buffer and its layout; unchanged if it has < 2 arrays, is packed, or holds other dtypes."""
    if len(record) < MIN_ARRAYS or is_packed(record):
        return record
    arrays = {name: np.asarray(array.numpy()) for name, array in record.items()}  # (tobytes is C order)
    if any(a.dtype.str not in DTYPES for a in arrays.values()):
        return record
    layout = [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]
    data = np.frombuffer(b"".join(a.tobytes() for a in arrays.values()), dtype=np.uint8)
    text = np.frombuffer(json.dumps(layout, separators=(",", ":")).encode(), dtype=np.uint8)
    return ArrayRecord({PACKED: Array(data), LAYOUT: Array(text)})


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The arrays a packed record holds, in their order; a record that is not packed is returned as it is."""
    if not is_packed(record):
        return record
    if set(record) != {PACKED, LAYOUT}:
        raise PackingError(f"a packed record holds exactly {PACKED!r} and {LAYOUT!r}, not {sorted(record)}")
    data, text = record[PACKED].numpy(), record[LAYOUT].numpy()
    for name, a in ((PACKED, data), (LAYOUT, text)):
        if a.dtype != np.uint8 or a.ndim != 1:
            raise PackingError(f"{name!r} must be a 1-D uint8 array, not {a.dtype} {a.shape}")
    if text.nbytes > MAX_LAYOUT_BYTES:
        raise PackingError(f"the layout is {text.nbytes} bytes (at most {MAX_LAYOUT_BYTES})")
    try:
        layout = json.loads(text.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackingError(f"the layout is not JSON: {err}") from None
    rows = _checked(layout)
    total = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, dtype, shape in rows)
    if total != data.nbytes:
        raise PackingError(f"the layout describes {total} bytes, the buffer holds {data.nbytes}")
    out, offset = {}, 0
    for name, dtype, shape in rows:
        count = math.prod(shape)
        array = np.frombuffer(data, dtype=np.dtype(dtype), count=count, offset=offset).reshape(shape)
        offset += count * np.dtype(dtype).itemsize
        out[name] = Array(array)
    return ArrayRecord(out)


def _checked(layout: object) -> list[tuple[str, str, tuple[int, ...]]]:
    if not isinstance(layout, list) or not layout:
        raise PackingError("the layout must be a non-empty list of [name, dtype, shape] rows")
    rows, names = [], set()
    for row in layout:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], str)
                and isinstance(row[2], list)):
            raise PackingError(f"layout row {str(row)[:80]!r} is not [name, dtype, shape]")
        name, dtype, shape = row
        if name in names or name in (PACKED, LAYOUT):
            raise PackingError(f"array name {name[:80]!r} appears twice or is reserved")
        if dtype not in DTYPES:
            raise PackingError(f"array {name[:80]!r}: dtype {dtype[:20]!r} is not one of {sorted(DTYPES)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape) or len(shape) > 8:
            raise PackingError(f"array {name[:80]!r}: shape {str(shape)[:80]} is not up to 8 sizes >= 0")
        names.add(name)
        rows.append((name, dtype, tuple(shape)))
    return rows


def pack_content(content: RecordDict) -> RecordDict:
    """A message's content with each ArrayRecord packed (other records are the same objects)."""
    return RecordDict({key: pack(value) if isinstance(value, ArrayRecord) else value
                       for key, value in content.items()})


def unpack_content(content: RecordDict) -> RecordDict:
    """A message's content with each packed ArrayRecord unpacked; raises `PackingError` naming the record."""
    out = {}
    for key, value in content.items():
        try:
            out[key] = unpack(value) if isinstance(value, ArrayRecord) else value
        except PackingError as err:
            raise PackingError(f"record {key!r}: {err}") from None
    return RecordDict(out)
