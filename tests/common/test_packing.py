"""Packing an ArrayRecord into one buffer for the wire: lossless, fewer objects, and a bad layout refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedrad.common.packing import LAYOUT, PACKED, PackingError, pack, pack_content, unpack, unpack_content

RNG = np.random.default_rng(0)


def _record() -> ArrayRecord:
    return ArrayRecord({"conv.weight": Array(RNG.normal(size=(8, 4, 3, 3)).astype(np.float32)),
                        "fc.bias": Array(np.array([0.5, -1.25], dtype=np.float32)),
                        "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),
                        "bn.running_var": Array(RNG.random(8)),  # float64
                        "mask": Array(np.array([True, False, True])),
                        "empty": Array(np.zeros((0, 3), dtype=np.float32))})


def test_pack_then_unpack_gives_the_same_arrays_in_the_same_order():
    record = _record()
    packed = pack(record)
    assert set(packed) == {PACKED, LAYOUT}
    back = unpack(packed)
    assert list(back) == list(record)
    for key in record:
        want, got = record[key].numpy(), back[key].numpy()
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.tobytes() == want.tobytes()  # to the bit, not to a tolerance


def test_packing_cuts_the_objects_a_message_is_moved_as():
    record = ArrayRecord({f"w{i}": Array(RNG.normal(size=(64, 64)).astype(np.float32)) for i in range(9)})
    content = RecordDict({"arrays": record, "config": ConfigRecord({"lr": 0.1})})
    before = len(get_all_nested_objects(content))
    after = len(get_all_nested_objects(pack_content(content)))
    assert before == 1 + 1 + 1 + 9 * 2  # RecordDict, ConfigRecord, ArrayRecord, 9 arrays with one chunk each
    assert after == 1 + 1 + 1 + 2 * 2  # ... and the buffer and the layout with one chunk each


def test_what_is_not_worth_packing_passes_unchanged():
    one = ArrayRecord({"only": Array(np.ones(3, dtype=np.float32))})
    assert pack(one) is one and unpack(one) is one
    packed = pack(_record())
    assert pack(packed) is packed  # not packed twice
    content = RecordDict({"config": ConfigRecord({"a": 1}), "arrays": _record()})
    assert unpack_content(pack_content(content))["config"] is content["config"]


def _packed_with(layout: object, data: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED: Array(np.frombuffer(data, dtype=np.uint8)),
                        LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8))})


@pytest.mark.parametrize("layout, data, says", [
    ([["w", "<f4", [4]]], bytes(12), "describes 16 bytes, the buffer holds 12"),
    ([["w", "<f4", [2]]], bytes(12), "describes 8 bytes"),
    ([["w", "|O", [1]]], bytes(8), "dtype '|O' is not one of"),
    ([["w", "<f4", [1]], ["w", "<f4", [1]]], bytes(8), "appears twice"),
    ([["w", "<f4", [-1]]], bytes(4), "is not up to 8 sizes >= 0"),
    ([["w", "<f4"]], bytes(4), "is not [name, dtype, shape]"),
    ({"w": 1}, bytes(4), "non-empty list"),
])
def test_a_layout_that_does_not_describe_its_buffer_is_refused(layout, data, says):
    with pytest.raises(PackingError, match=None) as err:
        unpack(_packed_with(layout, data))
    assert says in str(err.value)


def test_a_packed_record_with_anything_else_in_it_is_refused_and_named():
    bad = pack(_record())
    bad["extra"] = Array(np.ones(2, dtype=np.float32))
    with pytest.raises(PackingError, match="record 'arrays': a packed record holds exactly"):
        unpack_content(RecordDict({"arrays": bad}))
    text = ArrayRecord({PACKED: Array(np.zeros(4, dtype=np.uint8)),
                        LAYOUT: Array(np.frombuffer(b"\xff\xfe", dtype=np.uint8))})
    with pytest.raises(PackingError, match="not JSON"):
        unpack(text)
