"""FASTA records → validated, hashed rows: residue checks, cleaning, header fields, md5.

A chunk of raw records (:mod:`pipeline.fasta`) is cleaned (upper-cased, terminal ``*`` dropped)
and checked (empty header or sequence, residues outside the ESM alphabet) for the whole chunk at
once; each rejected record is one line naming the file, the record and its line, raised or
counted by the ``on_error`` policy (:class:`Rejector`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline import kernels
from pipeline.arrow_buffers import string_buffers, to_arrow, to_numpy
from pipeline.errors import InputFormatError
from pipeline.fasta import RawRecords, iter_raw_records
from pipeline.headers import gather_strings, parse_header_bytes

if TYPE_CHECKING:
    import polars as pl

RESIDUES = b"LAGVSERTIDPKQNFYMHWCXBUZO"  # 20 canonical + X B U Z O, as in the ESM alphabet


class Rejector:
    """Applies the on_error policy: raise a one-line error, or count and skip."""

    def __init__(self, path: Path, on_error: str,
                 count: Callable[[str, str], None] | None = None) -> None:
        self.path, self.on_error, self.count = path, on_error, count

    def __call__(self, reason: str, header: bytes, line: int, detail: str) -> None:
        name = header.split(maxsplit=1)[0].decode("utf-8", "replace") if header.strip() else ""
        parts = name.split("|")
        acc = parts[1] if len(parts) >= 3 else name
        record = f"record {acc}" if acc else "record with an empty header"
        message = f"{self.path}: {record} (line {line}): {detail}"
        if self.on_error == "fail" or self.count is None:
            raise InputFormatError(message)
        self.count(reason, message)


_VALID = np.zeros(256, bool)
_VALID[list(RESIDUES)] = True


@dataclass
class Clean:
    """The accepted records of a chunk: index into the chunk, upper-cased sequences (of all
    records), and the byte counts of ``residues`` where the compiled kernels took them."""

    index: np.ndarray
    residues: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray | None = None


_LOWER = np.zeros(256, bool)
_LOWER[ord("a") : ord("z") + 1] = True


def _has_lower(res: np.ndarray, counts: np.ndarray | None) -> bool:
    if counts is not None:
        return bool(counts[_LOWER].any())
    return bool(len(res)) and res.max() >= ord("a")


def _has_invalid(res: np.ndarray, counts: np.ndarray | None) -> bool:
    if counts is not None:
        return bool(counts[~_VALID].any())
    return bool(len(res)) and bool(res.min() < ord("A") or res.max() > ord("Z")
                                   or (res == ord("J")).any())


def clean(raw: RawRecords, rejector: Rejector) -> Clean:
    """Upper-case, drop a terminal '*', validate residues; returns the accepted records."""
    res, off = raw.residues, raw.offsets
    n = len(raw)
    lengths = np.diff(off)
    last = off[1:] - 1
    star = (lengths > 0) & (res[np.maximum(last, 0)] == 42) if len(res) else lengths > 0
    if star.any():
        keep = np.ones(len(res), bool)
        keep[last[star]] = False
        res = res[keep]
        lengths = lengths - star
        off = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
    # the compiled path checks the residues by their byte counts (one pass, which ingest keeps
    # as the chunk's residue counts); the numpy path by min/max
    counts = byte_counts(res) if kernels.SCAN is not None else None
    if _has_lower(res, counts):
        res = np.frombuffer(res.tobytes().upper(), np.uint8)
        counts = byte_counts(res) if counts is not None else None
    # reasons, in the order they are checked: 1 empty header, 2 empty sequence, 3 bad residue
    reason = np.zeros(n, np.int8)
    first_bad = np.full(n, -1, np.int64)
    if _has_invalid(res, counts):
        bad = np.flatnonzero(~_VALID[res])
        rec = np.searchsorted(off, bad, side="right") - 1
        first = np.r_[True, rec[1:] != rec[:-1]]
        first_bad[rec[first]] = bad[first]
        reason[rec] = 3
    reason[lengths == 0] = 2
    empty_header = raw.header_end == raw.header_start
    if raw.odd_bytes:  # a header of only b"\x0b\x0c"-style whitespace is empty too
        empty_header |= np.array([not raw.header(i).strip() for i in range(n)], bool)
    reason[empty_header] = 1
    rejected = np.flatnonzero(reason)
    for i in rejected.tolist():
        header, line = raw.header(i), int(raw.lines[i])
        if reason[i] == 1:
            rejector("empty_header", header, line, "empty header line")
        elif reason[i] == 2:
            rejector("empty_sequence", header, line, "empty sequence")
        else:
            shown = chr(res[first_bad[i]])  # latin-1
            pos = int(first_bad[i] - off[i]) + 1
            rejector("invalid_residue", header, line,
                     f"invalid residue {shown!r} at position {pos}")
    return Clean(np.flatnonzero(reason == 0), res, off, counts)


def read_sequences(
    path: str | Path, chunk_bytes: int = 4 << 20
) -> Iterator[tuple[str, str]]:
    """Yield ``(id, sequence)`` per record of a FASTA file, cleaned and checked as ingest does.

    ``id`` is the header's first word; sequences are upper-cased with a terminal ``*`` dropped.
    The first bad record raises :class:`InputFormatError` naming the file, record and line.
    """
    path = Path(path)
    rejector = Rejector(path, "fail")
    for raw in iter_raw_records(path, chunk_bytes):
        kept = clean(raw, rejector)
        residues, offsets = kept.residues.tobytes(), kept.offsets.tolist()
        for i in kept.index.tolist():
            record_id = raw.header(i).split(maxsplit=1)[0].decode("utf-8", "replace")
            yield record_id, residues[offsets[i] : offsets[i + 1]].decode("ascii")


_COUNT_BLOCK = 1 << 20


def byte_counts(data: np.ndarray) -> np.ndarray:
    """Counts of each byte value in a uint8 array."""
    counts = np.zeros(256, np.int64)
    if kernels.SCAN is not None:
        kernels.SCAN.byte_counts(np.ascontiguousarray(data), counts)
        return counts
    if len(data) % 2:
        counts[data[-1]] += 1
        data = data[:-1]
    pairs = np.zeros(1 << 16, np.int64)
    data = data.view(np.uint16)  # counting byte pairs halves the work
    for i in range(0, len(data), _COUNT_BLOCK):  # cache-sized blocks: ~15x faster
        pairs += np.bincount(data[i : i + _COUNT_BLOCK], minlength=1 << 16)
    pairs = pairs.reshape(256, 256)
    return counts + pairs.sum(axis=0) + pairs.sum(axis=1)


def residue_counts(sequences: pl.Series | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Counts of each byte value over strings (reads the Arrow data buffer)."""
    counts = np.zeros(256, np.int64)
    arr = sequences if isinstance(sequences, pa.Array | pa.ChunkedArray) else sequences.to_arrow()
    for chunk in arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]:
        data, offsets = string_buffers(chunk)
        counts += byte_counts(data[offsets[0] : offsets[-1]])
    return counts


def md5_hex(sequences: pa.Array) -> pa.Array:
    """Lower-case hex md5 digest of each string, as a LargeString array: in one compiled pass,
    or by polars-hash; both without holding the GIL, so parse threads hash in parallel."""
    scan = kernels.SCAN
    if scan is None:
        import polars as pl
        import polars_hash as plh

        frame = pl.DataFrame({"s": pl.Series("s", sequences)})
        return frame.select(plh.col("s").nchash.md5()).to_series().to_arrow().cast(
            pa.large_string())
    data, offsets = string_buffers(sequences)
    n = len(offsets) - 1
    hexed = np.empty(32 * n, np.uint8)
    scan.md5_hex(data, np.ascontiguousarray(offsets), hexed)
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(np.arange(0, 32 * n + 1, 32, dtype=np.int64)), pa.py_buffer(hexed))


@dataclass
class ChunkRows:
    """A chunk's accepted records as an Arrow table (``RECORD_SCHEMA`` order), and the residue
    counts of all of them."""

    table: pa.Table
    residue_counts: np.ndarray


def chunk_rows(raw: RawRecords, clean: Clean, source: int, rejector: Rejector) -> ChunkRows:
    """The accepted records of a chunk: header fields, length, sequence, md5, source, line."""
    import pyarrow.compute as pc  # (ingest loads it on a thread as the parse starts)

    idx = clean.index
    parsed = parse_header_bytes(raw.data, raw.header_start[idx], raw.header_end[idx])
    empty = to_numpy(pc.binary_length(parsed.column("accession"))) == 0
    if empty.any():
        for i in idx[np.flatnonzero(empty)].tolist():
            rejector("empty_header", raw.header(i), int(raw.lines[i]), "header has no identifier")
        parsed = parsed.filter(to_arrow(~empty))
        idx = idx[~empty]
    start, end = clean.offsets[idx], clean.offsets[idx + 1]
    sequences = gather_strings(clean.residues, start, end)
    n_residues = int((end - start).sum())
    if clean.counts is not None and len(idx) == len(raw):  # every record kept: all residues
        counts = clean.counts
    else:
        counts = byte_counts(np.frombuffer(sequences.buffers()[2], np.uint8)[:n_residues])
    table = (parsed
             .append_column("length", to_arrow((end - start).astype(np.int64)))
             .append_column("sequence", sequences)
             .append_column("seq_hash", md5_hex(sequences))
             .append_column("source", to_arrow(np.full(len(idx), source, np.int32)))
             .append_column("line", to_arrow(raw.lines[idx].astype(np.int64))))
    return ChunkRows(table, counts)
