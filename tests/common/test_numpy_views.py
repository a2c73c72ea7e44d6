"""numpy_views: the values of to_numpy, bit for bit, over the record's own bytes (no second copy), read-only."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedrad.common.records import numpy_views, to_numpy

ARRAYS = {"weights": np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32),
          "scalar": np.array(3.5), "counts": np.arange(7, dtype=np.int64), "empty": np.zeros((0, 4), np.float32),
          "mask": np.array([True, False, True]), "half": np.linspace(0, 1, 5, dtype=np.float16)}


def test_views_equal_to_numpy_in_dtype_shape_and_bits():
    record = ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})
    views, copies = numpy_views(record), to_numpy(record)
    assert list(views) == list(copies) == list(ARRAYS)
    for key, copy in copies.items():
        view = views[key]
        assert view.dtype == copy.dtype and view.shape == copy.shape
        assert view.tobytes() == copy.tobytes() == ARRAYS[key].tobytes()


def test_views_share_the_records_bytes_and_refuse_writes():
    record = ArrayRecord({"w": Array(ARRAYS["weights"])})
    view = numpy_views(record)["w"]
    assert np.shares_memory(view, np.frombuffer(record["w"].data, np.uint8))
    assert not np.shares_memory(to_numpy(record)["w"], np.frombuffer(record["w"].data, np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0, 0, 0] = 1.0


def test_a_fortran_ordered_array_is_copied_with_the_same_values():
    fortran = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    record = ArrayRecord({"f": Array(fortran)})
    view = numpy_views(record)["f"]
    assert np.array_equal(view, fortran) and view.flags.writeable
