"""Thrift's compact protocol, generically: a Parquet footer decoded to fields and encoded back
byte for byte (the order and form of every field kept), so that offsets in it can be edited.

A struct decodes to a list of :class:`Field` (in the order written); a list or set to a
:class:`Items`; scalars to int, float or bytes; a boolean field keeps its value in its type
(compact protocol: ``BOOL_TRUE``/``BOOL_FALSE``). ``encode(decode(b)) == b`` for any struct a
standard compact-protocol writer produced (short field-id deltas where they fit).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

STOP, BOOL_TRUE, BOOL_FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


class ThriftError(ValueError):
    """Bytes that are not a compact-protocol struct."""


@dataclass
class Field:
    """One field of a struct: its id, compact type and value."""

    id: int
    type: int
    value: Any


@dataclass
class Items:
    """A list or set: element type and elements."""

    kind: int  # LIST or SET
    elem_type: int
    values: list[Any]


def find(fields: list[Field], field_id: int) -> Field | None:
    """The field ``field_id`` of a decoded struct, if present."""
    for f in fields:
        if f.id == field_id:
            return f
    return None


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data, self.pos = memoryview(data).cast("B"), 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ThriftError("truncated compact-protocol data")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise ThriftError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ThriftError("truncated compact-protocol data")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def value(self, t: int) -> Any:
        if t in (BOOL_TRUE, BOOL_FALSE):  # in a collection: one byte
            return self.byte()
        if t == BYTE:
            return self.byte()
        if t in (I16, I32, I64):
            return self.zigzag()
        if t == DOUBLE:
            return struct.unpack("<d", self.take(8))[0]
        if t == BINARY:
            return self.take(self.varint())
        if t in (LIST, SET):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return Items(t, elem, [self.value(elem) for _ in range(size)])
        if t == STRUCT:
            return self.struct()
        raise ThriftError(f"unsupported compact type {t}")

    def struct(self) -> list[Field]:
        fields: list[Field] = []
        last = 0
        while True:
            head = self.byte()
            if head == STOP:
                return fields
            t, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            value = None if t in (BOOL_TRUE, BOOL_FALSE) else self.value(t)
            fields.append(Field(fid, t, value))
            last = fid


def decode(data: bytes | memoryview) -> tuple[list[Field], int]:
    """The struct at the start of ``data`` and the number of bytes it took."""
    reader = _Reader(data)
    return reader.struct(), reader.pos


def _varint(n: int, out: bytearray) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(n: int, out: bytearray) -> None:
    _varint((n << 1) ^ (n >> 63), out)


def _value(t: int, v: Any, out: bytearray) -> None:
    if t in (BOOL_TRUE, BOOL_FALSE, BYTE):
        out.append(v)
    elif t in (I16, I32, I64):
        _zigzag(v, out)
    elif t == DOUBLE:
        out += struct.pack("<d", v)
    elif t == BINARY:
        _varint(len(v), out)
        out += v
    elif t in (LIST, SET):
        size = len(v.values)
        if size < 15:
            out.append(size << 4 | v.elem_type)
        else:
            out.append(0xF0 | v.elem_type)
            _varint(size, out)
        for item in v.values:
            _value(v.elem_type, item, out)
    elif t == STRUCT:
        if isinstance(v, bytes):  # a struct encoded before (see encode)
            out += v
        else:
            _struct(v, out)
    else:
        raise ThriftError(f"unsupported compact type {t}")


def _struct(fields: list[Field], out: bytearray) -> None:
    last = 0
    for f in fields:
        delta = f.id - last
        if 0 < delta <= 15:
            out.append(delta << 4 | f.type)
        else:
            out.append(f.type)
            _zigzag(f.id, out)
        if f.type not in (BOOL_TRUE, BOOL_FALSE):
            _value(f.type, f.value, out)
        last = f.id
    out.append(STOP)


def encode(fields: list[Field]) -> bytes:
    """``fields`` as a compact-protocol struct. A struct value (a field's, or a list's element)
    may be given as the bytes :func:`encode` made of it: they are written as they are."""
    out = bytearray()
    _struct(fields, out)
    return bytes(out)
