"""ParquetSink: row groups encoded in parallel give the bytes of one pyarrow ParquetWriter;
the compact-protocol codec round-trips Parquet footers."""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import thrift_compact as tc
from pipeline.parquet_sink import ParquetSink


def _table(n: int, seed: int = 0) -> pa.Table:
    """Rows like ingest's: long random strings (dictionary encoding falls back), short
    repeated ones (it does not), hex hashes, ints, nulls."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    lengths = rng.integers(20, 400, n)
    residues = letters[rng.integers(0, 20, int(lengths.sum()))].tobytes().decode()
    ends = np.cumsum(lengths)
    sequences = [residues[e - k : e] for e, k in zip(ends.tolist(), lengths.tolist(), strict=True)]
    return pa.table({
        "accession": pa.array([f"A{i:08d}" for i in range(n)], pa.large_string()),
        "db": pa.array(["sp" if i % 7 == 0 else "tr" for i in range(n)], pa.large_string()),
        "taxid": pa.array([None if i % 5 == 0 else i % 97 for i in range(n)], pa.int64()),
        "sequence": pa.array(sequences, pa.large_string()),
        "seq_hash": pa.array([f"{x:032x}" for x in rng.integers(0, 2**62, n).tolist()],
                             pa.large_string()),
    })


def _reference(table: pa.Table, path: Path, rows: int) -> bytes:
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        for start in range(0, table.num_rows, rows):
            writer.write_table(table.slice(start, rows).combine_chunks(), rows)
    return path.read_bytes()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("cut", [997, 5000, 20_000])
def test_the_bytes_are_one_writers_whatever_the_threads_and_cuts(tmp_path, threads, cut):
    table = _table(12_345)
    rows = 4000  # 4 row groups, the last short
    expected = _reference(table, tmp_path / "ref.parquet", rows)
    out = tmp_path / "out.parquet"
    with ThreadPoolExecutor(threads) as pool, ParquetSink(out, rows, pool, depth=threads) as sink:
        for start in range(0, table.num_rows, cut):
            sink.write(table.slice(start, cut))
    assert out.read_bytes() == expected
    assert sink.rows == table.num_rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "ref.parquet"]
    back = pq.read_table(out)
    assert back.equals(table)
    assert pq.ParquetFile(out).metadata.num_row_groups == 4


@pytest.mark.parametrize("depth", [1, 2])
def test_a_longer_file_at_the_path_is_cut_to_the_new_one(tmp_path, depth):
    """The sink opens its path without O_TRUNC (ext4 would write the file out at close):
    whatever was there is overwritten and cut at the footer's end."""
    table = _table(3000)
    expected = _reference(table, tmp_path / "ref.parquet", 1000)
    out = tmp_path / "out.parquet"
    out.write_bytes(b"x" * (len(expected) + 12345))
    with ThreadPoolExecutor(2) as pool, ParquetSink(out, 1000, pool, depth=depth) as sink:
        sink.write(table)
    assert out.read_bytes() == expected


def test_without_copy_file_range_the_chunks_are_copied_through_memory(tmp_path, monkeypatch):
    """Where the kernel cannot copy between the files (no os.copy_file_range, or it fails), the
    row groups encoded into temporaries (two in flight) are read and written back: the same
    bytes."""
    import os

    from pipeline import parquet_sink

    table = _table(2500)
    expected = _reference(table, tmp_path / "ref.parquet", 1000)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    with ThreadPoolExecutor(2) as pool, ParquetSink(tmp_path / "a.parquet", 1000, pool, 2) as sink:
        sink.write(table)
    assert (tmp_path / "a.parquet").read_bytes() == expected

    def refuses(*_):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(parquet_sink.os, "copy_file_range", refuses, raising=False)
    with ThreadPoolExecutor(2) as pool, ParquetSink(tmp_path / "b.parquet", 1000, pool, 2) as sink:
        sink.write(table)
    assert (tmp_path / "b.parquet").read_bytes() == expected


def test_many_row_groups(tmp_path):
    """More row groups than a compact list header holds in its short form (15)."""
    table = _table(4100, seed=2)
    expected = _reference(table, tmp_path / "ref.parquet", 100)
    with ThreadPoolExecutor(2) as pool, ParquetSink(tmp_path / "out.parquet", 100, pool) as sink:
        for start in range(0, table.num_rows, 333):
            sink.write(table.slice(start, 333))
    assert (tmp_path / "out.parquet").read_bytes() == expected
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups == 41


def test_a_later_table_is_cast_to_the_first_ones_schema(tmp_path):
    table = _table(300)
    narrow = table.cast(pa.schema([f.with_type(pa.string()) if f.type == pa.large_string()
                                   else f for f in table.schema]))
    expected = _reference(table, tmp_path / "ref.parquet", 200)
    with ParquetSink(tmp_path / "out.parquet", 200) as sink:
        sink.write(table.slice(0, 150))
        sink.write(narrow.slice(150))
    assert (tmp_path / "out.parquet").read_bytes() == expected


def test_no_rows_write_no_file(tmp_path):
    with ParquetSink(tmp_path / "out.parquet", 10) as sink:
        sink.write(_table(0))
    assert sink.rows == 0
    assert list(tmp_path.iterdir()) == []


def _left_behind(root: Path, out: Path) -> list[str]:
    """Files other than ``out`` under ``root``; ``out`` must not read as Parquet."""
    if out.exists():
        with pytest.raises(pa.ArrowInvalid):
            pq.read_metadata(out)
    return [p.name for p in root.iterdir() if p != out]


def test_a_table_that_does_not_fit_the_schema_abandons_the_file(tmp_path):
    table = _table(50)
    bad = table.set_column(2, "taxid", pa.array(["not a number"] * 50))  # cannot cast to int64
    out = tmp_path / "out.parquet"
    with pytest.raises(pa.ArrowInvalid), ParquetSink(out, 20, depth=1) as sink:
        sink.write(table)
        sink.write(bad)
    assert _left_behind(tmp_path, out) == []


@pytest.mark.parametrize("depth", [1, 2], ids=["straight-into-the-output", "temporaries"])
def test_an_encoding_error_in_a_worker_abandons_the_file_and_its_row_groups(tmp_path,
                                                                              monkeypatch, depth):
    """A failure after row groups were written (and half of the next): the output is emptied
    (one row group in flight is encoded into it) and the encoded temporaries are deleted."""
    from pipeline import parquet_sink

    calls = []

    def failing(table, schema, dest):
        calls.append(dest)
        if len(calls) == 3:
            if isinstance(dest, Path):
                dest.write_bytes(b"PAR1half")
            else:
                dest.write(b"PAR1half")
            raise OSError("disk full")
        return parquet_sink.encode_row_group.__wrapped__(table, schema, dest)

    failing.__wrapped__ = parquet_sink.encode_row_group
    monkeypatch.setattr(parquet_sink, "encode_row_group", failing)
    out = tmp_path / "out.parquet"
    with (ThreadPoolExecutor(2) as pool, pytest.raises(OSError, match="disk full"),
          ParquetSink(out, 10, pool, depth=depth) as sink):
        for start in range(0, 100, 7):
            sink.write(_table(100).slice(start, 7))
    assert len(calls) >= 3
    kind = parquet_sink.OutputTail if depth == 1 else Path
    assert all(isinstance(dest, kind) for dest in calls)
    assert out.stat().st_size == 0
    assert _left_behind(tmp_path, out) == []


def _footer(path: Path) -> bytes:
    data = path.read_bytes()
    (n,) = struct.unpack("<I", data[-8:-4])
    return data[-8 - n : -8]


def test_compact_protocol_round_trips_a_parquet_footer(tmp_path):
    path = tmp_path / "t.parquet"
    table = _table(100).append_column("flag", pa.array([i % 2 == 0 for i in range(100)]))
    pq.write_table(table, path, compression="zstd", row_group_size=30)
    footer = _footer(path)
    fields, used = tc.decode(footer)
    assert used == len(footer)
    assert tc.encode(fields) == footer
    assert tc.find(fields, 3).value == 100  # num_rows
    assert len(tc.find(fields, 4).value.values) == 4  # row groups
    assert tc.find(fields, 6).value.startswith(b"parquet-cpp-arrow")


def test_compact_protocol_rejects_truncated_data(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(_table(10), path)
    footer = _footer(path)
    with pytest.raises(tc.ThriftError, match="truncated"):
        tc.decode(footer[: len(footer) // 2])


@pytest.mark.parametrize("value", [0, 1, -1, 63, -64, 2**31, -(2**40), 2**62])
def test_compact_protocol_integers_and_long_field_deltas(value):
    fields = [tc.Field(1, tc.I64, value), tc.Field(40, tc.I32, 7), tc.Field(41, tc.BOOL_TRUE, None),
              tc.Field(42, tc.LIST, tc.Items(tc.LIST, tc.BINARY, [b"x"] * 20)),
              tc.Field(43, tc.STRUCT, [tc.Field(2, tc.DOUBLE, 1.5)])]
    data = tc.encode(fields)
    assert tc.decode(data) == (fields, len(data))
