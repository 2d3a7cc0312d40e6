"""Exact-duplicate collapse of an ingest partition, and its duplicate-accession check, in Arrow
and numpy.

A partition's rows are ordered by ``seq_hash``, then Swiss-Prot before TrEMBL, then accession;
each run of one ``seq_hash`` becomes one row of ``sequences.parquet`` (its first record, the
representative) and every record a row of ``records.parquet`` naming it. The order comes from
the md5's first 64 bits (a sort of integers); only rows that share those bits (the repeated
sequences) are ordered by the rest of the key. Arrow gathers the output columns once, in
pieces (:func:`collapse`). No Polars: its import (0.2 CPU-s) and its conversions to and from
Arrow cost the ingest benchmark more than the whole collapse does here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.arrow_buffers import equals, string_buffers, to_arrow, to_numpy
from pipeline.errors import InputFormatError
from pipeline.partition import string_hashes

MD5_HEX_DIGITS = 32
SEQUENCE_COLUMNS = [
    "accession", "db", "description", "taxid", "length", "sequence", "seq_hash", "n_records",
]
RECORD_COLUMNS = ["accession", "db", "taxid", "seq_hash", "rep_accession"]


def hex_value(hashes: pa.Array | pa.ChunkedArray, first: int, count: int) -> np.ndarray:
    """The value (uint64) of hex digits ``first .. first + count`` (an even count, at most 16)
    of each md5 hex digest in ``hashes``: ``bytes.fromhex`` of them all at once, read as
    big-endian integers. Lower-case digests order as their values do."""
    if count % 2 or not 0 < count <= 16 or first + count > MD5_HEX_DIGITS:
        raise ValueError(f"hex_value: digits {first}..{first + count} of an md5")
    data, offsets = string_buffers(hashes)
    n = len(offsets) - 1
    if n and not (np.diff(offsets) == MD5_HEX_DIGITS).all():
        raise ValueError(f"hex_value: expected {MD5_HEX_DIGITS} hex digits per md5")
    digits = data[offsets[0] : offsets[-1]].reshape(n, MD5_HEX_DIGITS)[:, first : first + count]
    value_bytes = np.zeros((n, 8), np.uint8)
    value_bytes[:, 8 - count // 2 :] = np.frombuffer(
        bytes.fromhex(digits.tobytes().decode("ascii")), np.uint8).reshape(n, count // 2)
    return value_bytes.view(">u8").ravel().astype(np.uint64)


def _ranks(order: np.ndarray) -> np.ndarray:
    """Each item's place in ``order`` (the inverse permutation)."""
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def collapse_order(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The partition's rows in output order (by ``seq_hash``, then ``db`` "sp" first, then
    ``accession``; strings by their bytes) and, in that order, which row starts a run of one
    ``seq_hash`` (its representative)."""
    import pyarrow.compute as pc

    hashes = table.column("seq_hash")
    high = hex_value(hashes, 0, 16)
    order = np.argsort(high)  # not stable: rows with equal high bits are ordered below
    sorted_high = high[order]
    starts = np.ones(len(order), bool)
    np.not_equal(sorted_high[1:], sorted_high[:-1], out=starts[1:])
    tied = np.flatnonzero(~starts[1:])  # place p and p + 1 share the first 64 bits
    if len(tied):
        places = np.union1d(tied, tied + 1)  # every place in a run of equal high bits
        rows = order[places]
        tie = table.select(["seq_hash", "db", "accession"]).take(to_arrow(rows))
        low = hex_value(tie.column("seq_hash"), 16, 16)
        not_sp = ~equals(tie.column("db"), b"sp")
        accession = _ranks(to_numpy(pc.sort_indices(tie.column("accession"))))
        # sorted by the high bits first, the runs keep their places
        within = np.lexsort((accession, not_sp, low, sorted_high[places]))
        order[places] = rows[within]
        low_at = np.zeros(len(order), np.uint64)
        low_at[places] = low[within]
        starts[tied + 1] = low_at[tied + 1] != low_at[tied]
    return order, starts


def collapse(table: pa.Table, piece_bytes: int) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Collapse identical sequences of a partition; Swiss-Prot, then the lowest accession,
    represents them. Yields (uniques, records) in ``SEQUENCE_COLUMNS`` and ``RECORD_COLUMNS``
    in pieces of about ``piece_bytes`` (what waits for the writer stays small whatever the
    partition's size), each column one chunk gathered by Arrow."""
    # one chunk per column first: Arrow's take concatenates a column's chunks at every call
    unique_columns = table.select(SEQUENCE_COLUMNS[:-1]).combine_chunks()
    record_columns = unique_columns.select(RECORD_COLUMNS[:-1])
    accession = unique_columns.column("accession")
    order, starts = collapse_order(unique_columns)
    first = np.flatnonzero(starts)
    n_records = np.diff(np.append(first, len(order)))
    representative = np.repeat(order[first], n_records)  # per record, in output order
    pieces = max(1, math.ceil(table.nbytes / piece_bytes))
    step_u, step_r = math.ceil(len(first) / pieces), math.ceil(len(order) / pieces)
    for i in range(pieces):
        u, r = slice(i * step_u, (i + 1) * step_u), slice(i * step_r, (i + 1) * step_r)
        uniques = unique_columns.take(to_arrow(order[first[u]]))
        uniques = uniques.append_column(
            pa.field("n_records", pa.int64()), to_arrow(n_records[u].astype(np.int64)))
        records = record_columns.take(to_arrow(order[r]))
        records = records.append_column(
            pa.field("rep_accession", accession.type), accession.take(to_arrow(representative[r])))
        yield uniques.combine_chunks(), records.combine_chunks()


def record_keys(rows: pa.Table) -> np.ndarray:
    """One int64 per record: its (source, line)."""
    source = to_numpy(rows.column("source")).astype(np.int64)
    return (source << 40) | to_numpy(rows.column("line")).astype(np.int64)


def duplicate_accessions(
    partitions: Iterable[pa.Table], sources: list[Path],
    reject: Callable[[str, str], None] | None,
) -> np.ndarray:
    """Check accession uniqueness partition by partition (``accession``, ``source``, ``line``
    columns); returns :func:`record_keys` of the records to drop: every one after the first
    (in input order) of an accession. Each is reported in input order within its partition:
    raised as :class:`InputFormatError` without ``reject``, else passed to it."""
    drops = [np.zeros(0, np.int64)]
    for table in partitions:
        hashes = string_hashes(table.column("accession"))
        ordered = np.sort(hashes)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if not len(repeated):
            continue  # the common case: one sort of integers
        # the records whose hash repeats (different accessions may share one): compared exactly
        rows = table.take(to_arrow(np.flatnonzero(np.isin(hashes, repeated))))
        seen: dict[str, tuple[int, int]] = {}
        dups = []
        for accession, source, line, key in sorted(zip(
                rows.column("accession").to_pylist(), rows.column("source").to_pylist(),
                rows.column("line").to_pylist(), record_keys(rows).tolist(), strict=True)):
            if accession in seen:
                dups.append((source, line, accession, key))
            else:
                seen[accession] = (source, line)
        for source, line, accession, _ in sorted(dups):
            first_source, first_line = seen[accession]
            message = (f"{sources[source]}: record {accession} (line {line}): duplicate "
                       f"accession (first seen in {sources[first_source].name} at line "
                       f"{first_line})")
            if reject is None:
                raise InputFormatError(message)
            reject("duplicate_accession", message)
        drops.append(np.array([key for *_, key in dups], np.int64))
    return np.concatenate(drops)
