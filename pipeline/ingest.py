"""FASTA → Parquet ingest: validation, header parsing, exact-duplicate collapse, statistics.

Records stream through in chunks. Each chunk is validated and written to on-disk partitions
(by sequence hash, and by accession for the duplicate-accession check), so that the final
collapse works one partition at a time: peak memory is set by ``chunk_bytes`` and
``bucket_bytes``, never by the size of the input. Outputs, sorted by ``seq_hash``:

* ``sequences.parquet``: one row per distinct sequence (its representative record);
* ``records.parquet``: every accepted input record → ``rep_accession`` (UniRef100-like map);
* ``stats/ingest.json``: counts, length histogram, residue counts, rejections by reason.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.atomic import atomic_dir, atomic_path, scratch_dir, write_text_atomic
from pipeline.build_dir import BuildDir
from pipeline.errors import InputFormatError
from pipeline.fasta import (
    GZIP_MAGIC,
    RawRecords,
    gather_strings,
    iter_raw_records,
    parse_header_bytes,
)
from pipeline.partition import BucketWriter, ParquetSink
from pipeline.progress import format_sizeof, progress_bar

try:  # CPython's own md5: the same digests as hashlib's, at a third of the per-call cost
    from _md5 import md5 as _md5
except ImportError:  # pragma: no cover
    from hashlib import md5 as _md5

RESIDUES = b"LAGVSERTIDPKQNFYMHWCXBUZO"  # 20 canonical + X B U Z O, as in the ESM alphabet
LENGTH_EDGES = [0, 50, 100, 200, 300, 400, 500, 750, 1022, 1500, 2000, 5000, 10000, 35000]
SEQUENCE_COLUMNS = [
    "accession", "db", "description", "taxid", "length", "sequence", "seq_hash", "n_records",
]
RECORD_COLUMNS = ["accession", "db", "taxid", "seq_hash", "rep_accession"]
ACC_COLUMNS = ["accession", "source", "line"]
_COUNT_BLOCK = 1 << 20
_GZIP_EXPANSION = 3.0  # uncompressed/compressed size of protein FASTA, for partition planning


@dataclass
class IngestStats:
    """Counters accumulated over all chunks."""

    inputs: list[dict] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    residue_counts: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    length_counts: np.ndarray = field(
        default_factory=lambda: np.zeros(len(LENGTH_EDGES), np.int64)
    )
    kept: int = 0
    kept_residues: int = 0
    min_length: int | None = None
    max_length: int = 0

    def reject(self, reason: str, message: str) -> None:
        self.rejected[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(message)

    def add_lengths(self, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        self.kept += len(lengths)
        self.kept_residues += int(lengths.sum())
        lo, hi = int(lengths.min()), int(lengths.max())
        self.min_length = lo if self.min_length is None else min(self.min_length, lo)
        self.max_length = max(self.max_length, hi)
        idx = np.searchsorted(LENGTH_EDGES, lengths, side="right") - 1
        self.length_counts += np.bincount(idx, minlength=len(LENGTH_EDGES))


class _Rejector:
    """Applies the on_error policy: raise a one-line error, or count and skip."""

    def __init__(self, path: Path, on_error: str, stats: IngestStats) -> None:
        self.path, self.on_error, self.stats = path, on_error, stats

    def __call__(self, reason: str, header: bytes, line: int, detail: str) -> None:
        name = header.split(maxsplit=1)[0].decode("utf-8", "replace") if header.strip() else ""
        parts = name.split("|")
        acc = parts[1] if len(parts) >= 3 else name
        record = f"record {acc}" if acc else "record with an empty header"
        message = f"{self.path}: {record} (line {line}): {detail}"
        if self.on_error == "fail":
            raise InputFormatError(message)
        self.stats.reject(reason, message)


_VALID = np.zeros(256, bool)
_VALID[list(RESIDUES)] = True
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


@dataclass
class _Clean:
    """The accepted records of a chunk: index into the chunk, upper-cased sequences."""

    index: np.ndarray
    residues: np.ndarray
    offsets: np.ndarray


def _clean(raw: RawRecords, rejector: _Rejector) -> _Clean:
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
    if len(res) and res.max() >= ord("a"):
        res = np.frombuffer(res.tobytes().upper(), np.uint8)
    # reasons, in the order they are checked: 1 empty header, 2 empty sequence, 3 bad residue
    reason = np.zeros(n, np.int8)
    first_bad = np.full(n, -1, np.int64)
    if len(res) and (res.min() < ord("A") or res.max() > ord("Z") or (res == ord("J")).any()):
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
    return _Clean(np.flatnonzero(reason == 0), res, off)


def read_sequences(
    path: str | Path, chunk_bytes: int = 4 << 20
) -> Iterator[tuple[str, str]]:
    """Yield ``(id, sequence)`` per record of a FASTA file, cleaned and checked as ingest does.

    ``id`` is the header's first word; sequences are upper-cased with a terminal ``*`` dropped.
    The first bad record raises :class:`InputFormatError` naming the file, record and line.
    """
    path = Path(path)
    rejector = _Rejector(path, "fail", IngestStats())
    for raw in iter_raw_records(path, chunk_bytes):
        clean = _clean(raw, rejector)
        residues, offsets = clean.residues.tobytes(), clean.offsets.tolist()
        for i in clean.index.tolist():
            record_id = raw.header(i).split(maxsplit=1)[0].decode("utf-8", "replace")
            yield record_id, residues[offsets[i] : offsets[i + 1]].decode("ascii")


def _md5_hex(residues: np.ndarray, start: np.ndarray, end: np.ndarray) -> pa.Array:
    """md5 hex digests of each ``residues[start[i]:end[i]]``, as a LargeString array."""
    view = memoryview(residues)
    spans = zip(start.tolist(), end.tolist(), strict=True)
    digests = b"".join([_md5(view[a:b]).digest() for a, b in spans])
    nibbles = np.frombuffer(digests, np.uint8)
    hexed = np.column_stack([_HEX[nibbles >> 4], _HEX[nibbles & 15]]).ravel()
    offsets = np.arange(0, 32 * len(start) + 1, 32, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(
        len(start), pa.py_buffer(offsets), pa.py_buffer(hexed)
    )


def _chunk_frame(raw: RawRecords, clean: _Clean, source: int, rejector: _Rejector) -> pl.DataFrame:
    idx = clean.index
    parsed = parse_header_bytes(raw.data, raw.header_start[idx], raw.header_end[idx])
    empty = parsed.get_column("accession").str.len_bytes() == 0
    if empty.any():
        for i in idx[np.flatnonzero(empty.to_numpy())].tolist():
            rejector("empty_header", raw.header(i), int(raw.lines[i]), "header has no identifier")
        keep = ~empty
        parsed = parsed.filter(keep)
        idx = idx[keep.to_numpy()]
    start, end = clean.offsets[idx], clean.offsets[idx + 1]
    return parsed.with_columns(
        pl.Series("length", end - start, dtype=pl.Int64),
        pl.Series("sequence", gather_strings(clean.residues, start, end)),
        pl.Series("seq_hash", _md5_hex(clean.residues, start, end)),
        pl.lit(source, dtype=pl.Int32).alias("source"),
        pl.Series("line", raw.lines[idx], dtype=pl.Int64),
    )


def plan_buckets(paths: Sequence[Path], bucket_bytes: int) -> int:
    """Number of on-disk partitions so that each holds about ``bucket_bytes`` of FASTA."""
    total = 0.0
    for p in paths:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            gz = fh.read(2) == GZIP_MAGIC
        total += size * (_GZIP_EXPANSION if gz else 1.0)
    return max(1, math.ceil(total / bucket_bytes))


Partition = Path | list[Path] | pl.DataFrame | None


def _load(part: Path | list[Path] | pl.DataFrame, columns: list[str] | None = None) -> pl.DataFrame:
    """A partition: Parquet file(s) on disk (one per ingest part, in input order), or (when there
    is only one partition) the frame itself."""
    if isinstance(part, pl.DataFrame):
        return part.select(columns) if columns else part
    if isinstance(part, list):
        return pl.concat([pl.read_parquet(p, columns=columns) for p in part], rechunk=False)
    return pl.read_parquet(part, columns=columns)


def _duplicate_accessions(
    buckets: list[Partition], sources: list[Path], on_error: str,
    stats: IngestStats,
) -> pl.DataFrame:
    """Check accession uniqueness bucket by bucket; returns (source, line) of records to drop."""
    drops = []
    for path in buckets:
        if path is None:
            continue
        df = _load(path, ACC_COLUMNS).sort(["accession", "source", "line"])
        dups = df.filter(pl.col("accession").is_first_distinct().not_())
        if dups.is_empty():
            continue
        first = df.filter(pl.col("accession").is_in(dups.get_column("accession").implode()))
        first = first.group_by("accession").agg(
            pl.col("source").first().alias("first_source"),
            pl.col("line").first().alias("first_line"),
        )
        dups = dups.join(first, on="accession", how="left").sort(["source", "line"])
        for row in dups.iter_rows(named=True):
            message = (
                f"{sources[row['source']]}: record {row['accession']} (line {row['line']}): "
                f"duplicate accession (first seen in {sources[row['first_source']].name} "
                f"at line {row['first_line']})"
            )
            if on_error == "fail":
                raise InputFormatError(message)
            stats.reject("duplicate_accession", message)
        drops.append(dups.select("source", "line"))
    if not drops:
        return pl.DataFrame(schema={"source": pl.Int32, "line": pl.Int64})
    return pl.concat(drops)


def _collapse(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Sort a partition and collapse identical sequences; Swiss-Prot, then lowest accession wins."""
    df = df.sort([pl.col("seq_hash"), (pl.col("db") != "sp"), pl.col("accession")])
    # Sorted, each sequence's records are one run: its first row is the representative.
    first = pl.col("seq_hash") != pl.col("seq_hash").shift(1, fill_value="")
    df = df.with_columns(
        pl.when(first).then(pl.col("accession")).forward_fill().alias("rep_accession"),
        pl.len().over(first.cum_sum()).cast(pl.Int64).alias("n_records"),
    )
    records = df.select(RECORD_COLUMNS)
    uniques = df.filter(pl.col("accession") == pl.col("rep_accession")).select(SEQUENCE_COLUMNS)
    return uniques, records


def _residue_counts(sequences: pl.Series) -> np.ndarray:
    """Counts of each residue letter over a String series (reads the Arrow data buffer)."""
    counts = np.zeros(256, np.int64)
    pairs = np.zeros(1 << 16, np.int64)
    arr = sequences.to_arrow()
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    for chunk in chunks:
        chunk = chunk.cast(pa.large_binary())
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)
        lo, hi = offsets[chunk.offset], offsets[chunk.offset + len(chunk)]
        data = np.frombuffer(chunk.buffers()[2], np.uint8)[lo:hi]
        if len(data) % 2:
            counts[data[-1]] += 1
            data = data[:-1]
        data = data.view(np.uint16)  # counting byte pairs halves the work
        for i in range(0, len(data), _COUNT_BLOCK):  # cache-sized blocks: ~15x faster
            pairs += np.bincount(data[i : i + _COUNT_BLOCK], minlength=1 << 16)
    pairs = pairs.reshape(256, 256)
    return counts + pairs.sum(axis=0) + pairs.sum(axis=1)


def _seq_bucket(n_buckets: int) -> pl.Expr:
    """Partition of a record by its sequence hash (identical sequences meet in one)."""
    return pl.col("seq_hash").str.slice(0, 6).str.to_integer(base=16) * n_buckets // (1 << 24)


def _acc_bucket(n_buckets: int) -> pl.Expr:
    """Partition of a record by its accession (for the duplicate-accession check)."""
    return pl.col("accession").hash(seed=0) % n_buckets


def _read_input(
    path: Path, source: int, on_error: str, chunk_bytes: int, stats: IngestStats
) -> Iterator[pl.DataFrame]:
    """The accepted records of one input, chunk by chunk; counts it in ``stats.inputs``."""
    rejector = _Rejector(path, on_error, stats)
    counts = {"file": path.name, "records": 0, "residues": 0}
    with progress_bar(desc=f"ingest {path.name}", unit=" seq", unit_scale=True) as bar:
        for raw in iter_raw_records(path, chunk_bytes):
            counts["records"] += len(raw)
            counts["residues"] += int(raw.offsets[-1])
            yield _chunk_frame(raw, _clean(raw, rejector), source, rejector)
            bar.update(len(raw))
            bar.set_postfix_str(f"{format_sizeof(counts['residues'], divisor=1024)} residues")
    stats.inputs.append(counts)


def _check_inputs(sources: Sequence[Path]) -> None:
    for p in sources:
        if not p.is_file():
            raise InputFormatError(f"{p}: no such file")


def ingest(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    on_error: str = "fail",
    chunk_bytes: int = 16 << 20,
    row_group_rows: int = 100_000,
    bucket_bytes: int = 128 << 20,
) -> dict:
    """Ingest FASTA files into ``out_dir``; returns the stats written to ``stats/ingest.json``."""
    sources = [Path(p) for p in inputs]
    out = BuildDir(out_dir)
    stats = IngestStats()
    _check_inputs(sources)
    n_buckets = plan_buckets(sources, bucket_bytes)
    with scratch_dir(out, "ingest") as tmp:
        # One partition: keep the chunk frames (as much memory as reading it back would take).
        frames: list[pl.DataFrame] | None = [] if n_buckets == 1 else None
        with (BucketWriter(tmp, "seq", n_buckets) as seq_buckets,
              BucketWriter(tmp, "acc", n_buckets) as acc_buckets):
            for source, path in enumerate(sources):
                for df in _read_input(path, source, on_error, chunk_bytes, stats):
                    if frames is not None:
                        frames.append(df)
                    else:
                        seq_buckets.write(df, _seq_bucket(n_buckets))
                        acc_buckets.write(df.select(ACC_COLUMNS), _acc_bucket(n_buckets))
        seq_paths: list[Partition] = seq_buckets.close()  # closed: the paths
        acc_paths: list[Partition] = acc_buckets.close()
        if frames is not None:
            frames = [f for f in frames if not f.is_empty()]
            seq_paths = acc_paths = [pl.concat(frames, rechunk=False) if frames else None]
            del frames
        drops = _duplicate_accessions(acc_paths, sources, on_error, stats)
        return _finish(out, seq_paths, drops, stats, row_group_rows)


PART_INFO = "part.json"


def ingest_part(
    inputs: Sequence[str | Path], index: int, part_dir: str | Path, *, on_error: str = "fail",
    chunk_bytes: int = 16 << 20, bucket_bytes: int = 128 << 20,
) -> dict:
    """Parse input ``index`` of ``inputs`` into ``part_dir`` (its partitions and ``part.json``),
    one job per input file: :func:`merge_parts` then finishes the build's ingest exactly as
    :func:`ingest` of all inputs would. The partitioning is planned over all inputs, so every
    part's partition ``i`` meets the others' at the merge."""
    sources = [Path(p) for p in inputs]
    if not 0 <= index < len(sources):
        raise InputFormatError(f"ingest part {index}: the build has {len(sources)} inputs")
    _check_inputs(sources)
    n_buckets = plan_buckets(sources, bucket_bytes)
    stats = IngestStats()
    dest = Path(part_dir)
    with atomic_dir(dest) as tmp:
        with (BucketWriter(tmp, "seq", n_buckets) as seq_buckets,
              BucketWriter(tmp, "acc", n_buckets) as acc_buckets):
            for df in _read_input(sources[index], index, on_error, chunk_bytes, stats):
                seq_buckets.write(df, _seq_bucket(n_buckets))
                acc_buckets.write(df.select(ACC_COLUMNS), _acc_bucket(n_buckets))
        info = {
            "index": index, "file": str(sources[index]), "partitions": n_buckets,
            "input": stats.inputs[0], "rejected": dict(stats.rejected),
            "rejected_examples": stats.examples,
        }
        (tmp / PART_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def merge_parts(
    inputs: Sequence[str | Path], part_dirs: Sequence[str | Path], out_dir: str | Path, *,
    on_error: str = "fail", row_group_rows: int = 100_000,
) -> dict:
    """Finish an ingest from one :func:`ingest_part` directory per input (in input order):
    duplicate accessions across all inputs, collapse, outputs and stats as :func:`ingest`."""
    sources = [Path(p) for p in inputs]
    parts = [Path(p) for p in part_dirs]
    if len(parts) != len(sources):
        raise InputFormatError(f"{len(parts)} ingest parts for {len(sources)} inputs")
    stats = IngestStats()
    infos = []
    for index, part in enumerate(parts):
        info_path = part / PART_INFO
        if not info_path.is_file():
            raise InputFormatError(f"{info_path}: missing (run 'esm2-data ingest --part {index}')")
        info = json.loads(info_path.read_text())
        if info["index"] != index or Path(info["file"]).name != sources[index].name:
            raise InputFormatError(f"{info_path}: made from {info['file']} (input {info['index']}),"
                                   f" not from input {index}, {sources[index]}")
        infos.append(info)
        stats.inputs.append(info["input"])
        stats.rejected.update(info["rejected"])
        stats.examples.extend(info["rejected_examples"][: 20 - len(stats.examples)])
    counts = sorted({info["partitions"] for info in infos})
    if len(counts) != 1:
        raise InputFormatError(f"{parts[0].parent}: ingest parts planned with different "
                               f"partition counts {counts} (rerun them)")

    def partitions(prefix: str) -> list[Partition]:
        """Partition i of every part that has one, in input order (None: empty everywhere)."""
        found: list[Partition] = []
        for i in range(counts[0]):
            files = [f for f in (p / f"{prefix}-{i:05d}.parquet" for p in parts) if f.is_file()]
            found.append(files or None)
        return found

    drops = _duplicate_accessions(partitions("acc"), sources, on_error, stats)
    return _finish(BuildDir(out_dir), partitions("seq"), drops, stats, row_group_rows)


def _finish(
    out: BuildDir, seq_paths: list[Partition], drops: pl.DataFrame,
    stats: IngestStats, row_group_rows: int,
) -> dict:
    """Collapse each partition in hash order and stream the two outputs; write the stats."""
    unique_residues = 0
    seq_out, rec_out = out.sequences, out.records
    with atomic_path(seq_out) as tmp_seq, atomic_path(rec_out) as tmp_rec:
        uniques_sink = ParquetSink(tmp_seq, row_group_rows)
        records_sink = ParquetSink(tmp_rec, row_group_rows)
        # The two files are encoded side by side, in threads (Parquet writing releases the GIL).
        pool = ThreadPoolExecutor(2, thread_name_prefix="ingest-write")
        try:
            for path in seq_paths:
                if path is None:
                    continue
                df = _load(path)
                if not drops.is_empty():
                    df = df.join(drops, on=["source", "line"], how="anti")
                stats.add_lengths(df.get_column("length").to_numpy())
                stats.residue_counts += _residue_counts(df.get_column("sequence"))
                uniques, records = _collapse(df)
                del df
                unique_residues += int(uniques.get_column("length").sum())
                _in_parallel(pool, (uniques_sink.write, uniques), (records_sink.write, records))
        finally:
            try:
                _in_parallel(pool, (uniques_sink.close,), (records_sink.close,))
            finally:
                pool.shutdown(wait=True)
        if uniques_sink.rows == 0:
            raise InputFormatError("no valid records in the input: nothing to ingest")
        report = _report(stats, uniques_sink.rows, unique_residues)
        write_text_atomic(out.stats("ingest"), json.dumps(report, indent=2) + "\n")
    return report


def _in_parallel(pool: ThreadPoolExecutor, *calls: tuple) -> None:
    """Run each ``(function, *args)`` in ``pool``; wait for all, then raise the first error."""
    futures = [pool.submit(*call) for call in calls]
    wait(futures)
    for future in futures:
        future.result()


def _report(stats: IngestStats, unique: int, unique_residues: int) -> dict:
    letters = [chr(c) for c in RESIDUES]
    rejected = dict(sorted(stats.rejected.items()))
    return {
        "inputs": stats.inputs,
        "records_read": sum(i["records"] for i in stats.inputs),
        "records_rejected": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "rejected_examples": stats.examples,
        "records_kept": stats.kept,
        "residues_kept": stats.kept_residues,
        "unique_sequences": unique,
        "unique_residues": unique_residues,
        "duplicate_records_collapsed": stats.kept - unique,
        "length": {
            "min": stats.min_length,
            "max": stats.max_length,
            "mean": round(stats.kept_residues / stats.kept, 3) if stats.kept else None,
            "histogram": {
                "edges": LENGTH_EDGES,
                "counts": stats.length_counts.tolist(),
            },
        },
        "residue_counts": {c: int(stats.residue_counts[ord(c)]) for c in sorted(letters)},
    }
