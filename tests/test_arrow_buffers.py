"""Numbers and booleans between numpy and Arrow through buffers: the values pyarrow's own
conversions give, for slices and chunks too; nulls and 2-D input are errors."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from pipeline.arrow_buffers import to_arrow, to_numpy


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint64, np.float64, np.bool_])
def test_round_trip_gives_pyarrows_values(dtype):
    rng = np.random.default_rng(1)
    values = (rng.integers(0, 2, 1000) if dtype == np.bool_ else rng.integers(-5, 1 << 30, 1000)
              ).astype(dtype)
    arr = to_arrow(values)
    assert arr.equals(pa.array(values))  # the type and values pa.array gives
    assert arr.null_count == 0
    back = to_numpy(arr)
    assert back.dtype == values.dtype and (back == values).all()
    for part in (arr.slice(3, 500), arr.slice(999), arr.slice(7, 0)):  # offsets into the buffer
        assert (to_numpy(part) == values[part.offset : part.offset + len(part)]).all()
    chunked = pa.chunked_array([arr.slice(0, 10), arr.slice(10, 5), arr.slice(15)])
    assert (to_numpy(chunked) == values).all()


def test_a_strided_array_is_copied_contiguous():
    values = np.arange(20, dtype=np.int64)[::3]
    assert to_arrow(values).to_pylist() == values.tolist()


def test_nulls_other_types_and_2d_input_are_errors():
    with pytest.raises(ValueError, match="1 nulls in a int64 column"):
        to_numpy(pa.array([1, None, 3]))
    with pytest.raises(ValueError, match="1-D array expected"):
        to_arrow(np.zeros((2, 2)))
    with pytest.raises(TypeError, match="numbers or booleans expected, got large_string"):
        to_numpy(pa.array(["a"], pa.large_string()))
    assert len(to_numpy(pa.array([], pa.int64()))) == 0


def test_string_buffers_give_each_values_bytes():
    from pipeline.arrow_buffers import string_buffers

    values = ["", "ab", "é", "xyz", ""]
    for column in (pa.array(values, pa.string()), pa.array(values, pa.large_binary()).slice(1, 3),
                   pa.chunked_array([pa.array(values[:2]), pa.array(values[2:])]),
                   pa.array([], pa.large_string())):
        data, offsets = string_buffers(column)
        assert offsets.dtype == np.int64 and len(offsets) == len(column) + 1
        want = [v.encode() if isinstance(v, str) else v for v in column.to_pylist()]
        assert [data[a:b].tobytes() for a, b in itertools.pairwise(offsets)] == want


def test_equals_compares_each_string_with_a_value():
    from pipeline.arrow_buffers import equals

    values = ["sp", "tr", "s", "spx", "", "sp", "ps"]
    for column in (pa.array(values, pa.large_string()), pa.array(values, pa.string()),
                   pa.chunked_array([pa.array(values[:3]), pa.array(values[3:])])):
        assert equals(column, b"sp").tolist() == [v == "sp" for v in values]
        assert equals(column, b"").tolist() == [v == "" for v in values]
    assert equals(pa.array(values).slice(2, 4), b"sp").tolist() == [False, False, False, True]
    assert equals(pa.array([], pa.large_string()), b"sp").tolist() == []
