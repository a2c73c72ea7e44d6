"""Packing a message's records into one buffer for the wire: lossless, fewer objects, and a bad layout refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedrad.common.packing import LAYOUT, PACKED, WIRE, PackingError, pack_content, pack_contents, unpack_content

RNG = np.random.default_rng(0)


def _content() -> RecordDict:
    arrays = ArrayRecord({"conv.weight": Array(RNG.normal(size=(8, 4, 3, 3)).astype(np.float32)),
                          "fc.bias": Array(np.array([0.5, -1.25], dtype=np.float32)),
                          "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),  # 0-d
                          "bn.running_var": Array(RNG.random(8)),  # float64
                          "mask": Array(np.array([True, False, True])),
                          "empty": Array(np.zeros((0, 3), dtype=np.float32))})
    return RecordDict({
        "config": ConfigRecord({"server-round": 3, "lr": 0.1, "lr-tiny": 1e-300, "name": "site-ä", "on": True,
                                "blob": b"\x00\xff", "blobs": [b"a", b""], "ints": [1, 2], "floats": [1.0, 2.5],
                                "empty": [], "big": 2**63 + 5}),
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": 40, "auc": 0.9123456789012345, "nan": float("nan"),
                                 "inf": float("-inf"), "curve": [0.1, 0.2]}),
        "bn-stats": ArrayRecord({"x.mean": Array(RNG.normal(size=4).astype(np.float32))}),
    })


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and (a == b if not isinstance(a, list) else all(map(_same, a, b)) and len(a) == len(b))


def test_pack_then_unpack_gives_the_same_records_arrays_and_values():
    content = _content()
    packed = pack_content(content)
    assert list(packed) == [WIRE] and sorted(packed[WIRE]) == sorted([PACKED, LAYOUT])
    back = unpack_content(packed)
    assert list(back) == list(content)
    for name, record in content.items():
        assert type(back[name]) is type(record) and list(back[name]) == list(record)
        if isinstance(record, ArrayRecord):
            for key in record:
                want, got = record[key].numpy(), back[name][key].numpy()
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.tobytes() == want.tobytes()  # to the bit, not to a tolerance
        else:
            for key, value in record.items():
                assert _same(value, back[name][key]), (name, key, value, back[name][key])


def test_packing_cuts_the_objects_a_message_is_moved_as():
    arrays = ArrayRecord({f"w{i}": Array(RNG.normal(size=(64, 64)).astype(np.float32)) for i in range(9)})
    bn = ArrayRecord({f"b{i}": Array(RNG.normal(size=32).astype(np.float32)) for i in range(14)})
    content = RecordDict({"arrays": arrays, "bn-stats": bn, "config": ConfigRecord({"lr": 0.1}),
                          "metrics": MetricRecord({"n": 3})})
    assert len(get_all_nested_objects(content)) == 1 + 2 + 2 + 2 * (9 + 14)  # RecordDict, records, arrays + chunks
    assert len(get_all_nested_objects(pack_content(content))) == 1 + 1 + 2 * 2  # one record, two arrays + chunks


def test_what_is_not_packed_passes_unchanged():
    content = RecordDict({"config": ConfigRecord({"a": 1})})
    assert unpack_content(content) is content  # not packed: as it is
    packed = pack_content(content)
    assert pack_content(packed) is packed  # not packed twice
    assert pack_content(RecordDict()).__len__() == 0
    odd = RecordDict({"arrays": ArrayRecord({"c": Array(np.ones(2, dtype=np.complex64))})})
    assert pack_content(odd) is odd  # a dtype not ours: Flower sends it as it would


def _packed_with(layout: object, data: bytes) -> RecordDict:
    return RecordDict({WIRE: ArrayRecord({PACKED: Array(np.frombuffer(data, dtype=np.uint8)),
                                          LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8))})})


@pytest.mark.parametrize("layout, data, says", [
    ([["a", "arrays", [["w", "<f4", [4]]]]], bytes(12), "more than the buffer's 12 bytes"),
    ([["a", "arrays", [["w", "<f4", [2]]]]], bytes(12), "the layout describes 8 bytes, the buffer holds 12"),
    ([["a", "arrays", [["w", "|O", [1]]]]], bytes(8), "record 'a': array 'w': dtype '|O' is not one of"),
    ([["a", "arrays", [["w", "<f4", [1]], ["w", "<f4", [1]]]]], bytes(8), "array name 'w' appears twice"),
    ([["a", "arrays", [["w", "<f4", [-1]]]]], bytes(4), "is not up to 8 sizes >= 0"),
    ([["a", "arrays", [["w", "<f4"]]]], bytes(4), "is not [name, dtype, shape]"),
    ([["a", "arrays", []], ["a", "config", {}]], b"", "record 'a' appears twice"),
    ([["a", "pickle", {}]], b"", "is not [record, kind, contents]"),
    ([["m", "metrics", {"x": "text"}]], b"", "record 'm': a value Flower's MetricRecord does not hold"),
    ([["c", "config", {"x": None}]], b"", "a value Flower's ConfigRecord does not hold"),
    ([["c", "config", {"x": {"eval": "1"}}]], b"", "an object other than"),
    ([["c", "config", {"x": {"b64": "!!"}}]], b"", "not base64"),
    ({"a": 1}, b"", "non-empty list"),
])
def test_a_layout_that_does_not_describe_its_buffer_is_refused(layout, data, says):
    with pytest.raises(PackingError) as err:
        unpack_content(_packed_with(layout, data))
    assert says in str(err.value)


def test_packed_content_with_anything_else_in_it_is_refused():
    bad = pack_content(_content())
    bad["extra"] = ConfigRecord({"a": 1})
    with pytest.raises(PackingError, match="packed content is one ArrayRecord"):
        unpack_content(bad)
    text = RecordDict({WIRE: ArrayRecord({PACKED: Array(np.zeros(4, dtype=np.uint8)),
                                          LAYOUT: Array(np.frombuffer(b"\xff\xfe", dtype=np.uint8))})})
    with pytest.raises(PackingError, match="not JSON"):
        unpack_content(text)


def test_equal_contents_are_packed_once_and_share_the_packed_content():
    arrays = _content()["arrays"]
    a = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2})})
    b = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2})})  # equal values, another object
    c = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 3})})
    d = RecordDict({"arrays": ArrayRecord(dict(arrays.items())), "config": ConfigRecord({"server-round": 2})})
    pa, pb, pc, pd = pack_contents([a, b, c, d])
    assert pa is pb  # the same model to two sites: its bytes packed once
    assert pc is not pa and pd is not pa  # other values, or another ArrayRecord: packed on their own
    for content, packed in zip([a, b, c, d], [pa, pb, pc, pd]):
        assert unpack_content(packed)["config"]["server-round"] == content["config"]["server-round"]
