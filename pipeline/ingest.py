"""FASTA → Parquet ingest: exact-duplicate collapse and statistics of validated records.

Records stream through in chunks. Parse workers (:mod:`pipeline.ingest_chunks`) validate each
chunk (:mod:`pipeline.records`) and write it to on-disk partitions (by sequence hash, and by
accession for the duplicate-accession check), so that the final collapse works one partition at
a time: peak memory is set by ``chunk_bytes`` and ``bucket_bytes``, never by the size of the
input. At most ``partition.MAX_FANOUT`` partitions are written at once; a larger input's plan
splits each of them on disk before the collapse (open files and write sizes stay bounded at any
release size). Outputs, sorted by ``seq_hash``:

* ``sequences.parquet``: one row per distinct sequence (its representative record);
* ``records.parquet``: every accepted input record → ``rep_accession`` (UniRef100-like map);
* ``stats/ingest.json``: counts, length histogram, residue counts, rejections by reason.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.arrow_buffers import to_arrow, to_numpy
from pipeline.atomic import atomic_dir, atomic_path, scratch_dir, write_text_atomic
from pipeline.build_dir import BuildDir
from pipeline.collapse import collapse, duplicate_accessions, record_keys
from pipeline.errors import InputFormatError
from pipeline.fasta import GZIP_MAGIC
from pipeline.ingest_chunks import (
    ChunkParser,
    ParsedChunk,
    acc_keys,
    partition_files,
    seq_keys,
    usable_cpus,
)
from pipeline.ingest_defaults import BUCKET_BYTES, CHUNK_BYTES, ROW_GROUP_ROWS
from pipeline.memory import arrow_jemalloc, trim_heap
from pipeline.parquet_sink import ParquetSink
from pipeline.partition import fanout, iter_split
from pipeline.progress import format_sizeof, progress_bar
from pipeline.records import RESIDUES, residue_counts

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

# length histogram edges; 1022 is ESM-2's crop (training.model.config.MAX_RESIDUES)
LENGTH_EDGES = [0, 50, 100, 200, 300, 400, 500, 750, 1022, 1500, 2000, 5000, 10000, 35000]
_GZIP_EXPANSION = 3.0  # uncompressed/compressed size of protein FASTA, for partition planning
_PIECE_BYTES = 8 << 20  # a collapsed partition goes to the writer in pieces of about this size


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


def plan_buckets(paths: Sequence[Path], bucket_bytes: int) -> int:
    """Number of on-disk partitions so that each holds about ``bucket_bytes`` of FASTA."""
    total = 0.0
    for p in paths:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            gz = fh.read(2) == GZIP_MAGIC
        total += size * (_GZIP_EXPANSION if gz else 1.0)
    return max(1, math.ceil(total / bucket_bytes))


Partition = Path | list[Path] | pa.Table | None


def _read_input(
    parser: ChunkParser, path: Path, source: int, on_error: str, stats: IngestStats,
) -> Iterator[ParsedChunk]:
    """The parsed chunks of one input, in order; counts it and its rejections in ``stats``."""
    counts = {"file": path.name, "records": 0, "residues": 0}
    with progress_bar(desc=f"ingest {path.name}", unit=" seq", unit_scale=True) as bar:
        for chunk in parser.parse(path, source, on_error):
            counts["records"] += chunk.records
            counts["residues"] += chunk.residues
            stats.residue_counts += chunk.residue_counts
            for reason, message in chunk.rejections:
                stats.reject(reason, message)
            yield chunk
            bar.update(chunk.records)
            bar.set_postfix_str(f"{format_sizeof(counts['residues'], divisor=1024)} residues")
    stats.inputs.append(counts)


def _rejects(on_error: str, stats: IngestStats) -> Callable[[str, str], None] | None:
    """Where a rejected record goes: nowhere (``fail``: it is raised) or into ``stats``."""
    return None if on_error == "fail" else stats.reject


def _check_inputs(sources: Sequence[Path]) -> None:
    for p in sources:
        if not p.is_file():
            raise InputFormatError(f"{p}: no such file")


# What the parse does not need to start (Arrow's compute functions, ~0.03 s to import, first
# used on a parsed chunk): loaded on a thread of its own while the parse runs, not before it.
# Nothing in ingest loads pandas (pipeline.arrow_buffers): its import held every parse worker
# for 0.2 s; nor Polars (pipeline.collapse): its import took 0.2 CPU-s from the parse.
_LOADED_DURING_PARSE = ("pyarrow.compute",)


def _import_during_parse() -> None:
    """Start importing ``_LOADED_DURING_PARSE`` on a thread (not a daemon: the process waits
    for it rather than stopping an import half-way); a module's first user waits for it."""
    def load() -> None:
        for name in _LOADED_DURING_PARSE:
            with contextlib.suppress(ImportError):  # raised again where it is used
                importlib.import_module(name)

    threading.Thread(target=load, name="ingest-imports").start()


def ingest(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    on_error: str = "fail",
    chunk_bytes: int = CHUNK_BYTES,
    row_group_rows: int = ROW_GROUP_ROWS,
    bucket_bytes: int = BUCKET_BYTES,
    workers: int = 0,
    worker_kind: str = "auto",
) -> dict:
    """Ingest FASTA files into ``out_dir``; returns the stats written to ``stats/ingest.json``.

    ``workers`` threads or processes (``worker_kind``: "thread", "process", or "auto": threads
    up to 4 workers, processes beyond) parse the chunks (0: one per usable CPU; 1: the calling
    thread); the outputs do not depend on either."""
    sources = [Path(p) for p in inputs]
    out = BuildDir(out_dir)
    stats = IngestStats()
    _check_inputs(sources)
    _import_during_parse()
    planned = plan_buckets(sources, bucket_bytes)
    with scratch_dir(out, "ingest") as tmp:
        # One partition: keep the chunk tables (as much memory as reading it back would take).
        in_memory = planned == 1
        tables: list[pa.Table] = []
        with ChunkParser(workers, chunk_bytes, None if in_memory else tmp, fanout(planned),
                         worker_kind) as parser:
            for source, path in enumerate(sources):
                for chunk in _read_input(parser, path, source, on_error, stats):
                    if in_memory and chunk.table.num_rows:
                        tables.append(chunk.table)
        if in_memory:
            seq_parts = acc_parts = [pa.concat_tables(tables) if tables else None]
            del tables
        else:
            seq_parts = partition_files(tmp, "seq", fanout(planned))
            acc_parts = partition_files(tmp, "acc", fanout(planned))
        return _check_and_finish(
            out, iter_split(acc_parts, planned, acc_keys, tmp / "acc", consume=True),
            iter_split(seq_parts, planned, seq_keys, tmp / "seq", consume=True), sources,
            on_error, stats, row_group_rows)


PART_INFO = "part.json"


def ingest_part(
    inputs: Sequence[str | Path], index: int, part_dir: str | Path, *, on_error: str = "fail",
    chunk_bytes: int = CHUNK_BYTES, bucket_bytes: int = BUCKET_BYTES,
    workers: int = 0,
    worker_kind: str = "auto",
) -> dict:
    """Parse input ``index`` into ``part_dir`` (partitions planned over all inputs, and
    ``part.json``), one job per input: :func:`merge_parts` then finishes exactly as
    :func:`ingest` of all inputs would."""
    sources = [Path(p) for p in inputs]
    if not 0 <= index < len(sources):
        raise InputFormatError(f"ingest part {index}: the build has {len(sources)} inputs")
    _check_inputs(sources)
    _import_during_parse()
    planned = plan_buckets(sources, bucket_bytes)
    stats = IngestStats()
    dest = Path(part_dir)
    with atomic_dir(dest) as tmp:
        with ChunkParser(workers, chunk_bytes, tmp, fanout(planned), worker_kind) as parser:
            for _ in _read_input(parser, sources[index], index, on_error, stats):
                pass
        info = {"index": index, "file": str(sources[index]), "partitions": planned,
                "input": stats.inputs[0], "rejected": dict(stats.rejected),
                "rejected_examples": stats.examples,
                "residue_counts": stats.residue_counts.tolist()}
        (tmp / PART_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def merge_parts(
    inputs: Sequence[str | Path], part_dirs: Sequence[str | Path], out_dir: str | Path, *,
    on_error: str = "fail", row_group_rows: int = ROW_GROUP_ROWS,
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
        stats.residue_counts += np.asarray(info["residue_counts"], np.int64)
        stats.examples.extend(info["rejected_examples"][: 20 - len(stats.examples)])
    counts = sorted({info["partitions"] for info in infos})
    if len(counts) != 1:
        raise InputFormatError(f"{parts[0].parent}: ingest parts planned with different "
                               f"partition counts {counts} (rerun them)")

    planned = counts[0]

    def partitions(prefix: str) -> list[Partition]:
        """Partition i of every part that has one, in input order (None: empty everywhere)."""
        per_part = [partition_files(p, prefix, fanout(planned)) for p in parts]
        return [[f for files in per_part for f in files[i] or []] or None
                for i in range(fanout(planned))]

    out = BuildDir(out_dir)
    with scratch_dir(out, "ingest-merge") as tmp:
        return _check_and_finish(
            out, iter_split(partitions("acc"), planned, acc_keys, tmp / "acc"),
            iter_split(partitions("seq"), planned, seq_keys, tmp / "seq"), sources, on_error,
            stats, row_group_rows)


def _check_and_finish(
    out: BuildDir, accessions: Iterable[pa.Table], partitions: Iterable[pa.Table],
    sources: list[Path], on_error: str, stats: IngestStats, row_group_rows: int,
) -> dict:
    """The duplicate-accession check over the ``accessions`` partitions, then :func:`_finish`
    of the sequence ``partitions``. Where a duplicate fails the run (``on_error`` "fail": no
    record is ever dropped) the check runs on a thread of its own beside the collapse, and the
    outputs are kept only once it has passed; its error, if any, is the one raised (an
    interrupt stops the check at its next partition instead)."""
    if on_error != "fail":
        drops = duplicate_accessions(accessions, sources, _rejects(on_error, stats))
        return _finish(out, partitions, drops, stats, row_group_rows)
    interrupted = threading.Event()

    def until_interrupted(tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """``tables``, none read once interrupted (the flag is seen before the next read)."""
        remaining = iter(tables)
        while not interrupted.is_set():
            table = next(remaining, None)
            if table is None:
                return
            yield table

    with ThreadPoolExecutor(1, thread_name_prefix="ingest-accessions") as pool:
        check = pool.submit(duplicate_accessions, until_interrupted(accessions), sources, None)
        try:
            return _finish(out, partitions, np.zeros(0, np.int64), stats, row_group_rows,
                           check)
        except Exception:
            check.result()  # a duplicate accession, found first in a one-thread run
            raise
        finally:  # done, or Ctrl-C/SystemExit (also while waiting above): stop the check
            interrupted.set()


def _finish(
    out: BuildDir, partitions: Iterable[pa.Table], drops: np.ndarray,
    stats: IngestStats, row_group_rows: int, check: Future[np.ndarray] | None = None,
) -> dict:
    """Collapse each partition in hash order and stream the two outputs; write the stats.
    The outputs are kept only if ``check`` (a check running beside this) passes: its error
    stops the collapse as soon as it is seen, and abandons them."""
    import pyarrow.compute as pc

    unique_residues = 0
    seq_out, rec_out = out.sequences, out.records
    trim_heap()  # what the parse freed: this phase's peak is then its own partitions
    # Row groups are encoded on every CPU (pipeline.parquet_sink) while this thread collapses
    # the next partition; each file has up to half the CPUs' worth of row groups in flight (on
    # 2 CPUs one each: two measured no faster and ~35 MiB larger).
    cpus = usable_cpus()
    depth = max(1, cpus // 2)
    with (arrow_jemalloc(), atomic_path(seq_out) as tmp_seq, atomic_path(rec_out) as tmp_rec,
          ThreadPoolExecutor(cpus, thread_name_prefix="ingest-encode") as pool,
          ParquetSink(tmp_seq, row_group_rows, pool, depth) as uniques_sink,
          ParquetSink(tmp_rec, row_group_rows, pool, depth) as records_sink):
        for table in partitions:
            if check is not None and check.done():
                check.result()  # raises its error now, not after the whole collapse
            if len(drops):  # duplicate accessions skipped: uncount their residues
                dropped = np.isin(record_keys(table), drops)
                sequences = table.column("sequence").filter(to_arrow(dropped))
                stats.residue_counts -= residue_counts(sequences)
                table = table.filter(to_arrow(~dropped))
            stats.add_lengths(to_numpy(table.column("length")))
            for uniques, records in collapse(table, _PIECE_BYTES):
                unique_residues += int(pc.sum(uniques.column("length")).as_py() or 0)
                uniques_sink.write(uniques)
                records_sink.write(records)
                del uniques, records
            del table
        uniques_sink.close()
        records_sink.close()
        if check is not None:
            check.result()
        if uniques_sink.rows == 0:
            raise InputFormatError("no valid records in the input: nothing to ingest")
        report = _report(stats, uniques_sink.rows, unique_residues)
        write_text_atomic(out.stats("ingest"), json.dumps(report, indent=2) + "\n")
    return report


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


def run(cfg: BuildConfig, part: int | None = None, merge: bool = False,
        worker_kind: str = "auto") -> dict:
    """The ingest stage of a build (``cfg.threads`` processes parse): all inputs in one run;
    or one input (``part``), or the merge of all parts, so that a build's inputs are parsed as
    parallel jobs (the Snakefile's ``ingest_part`` rule)."""
    opts = cfg.ingest
    inputs = [cfg.raw_path(item) for item in cfg.fasta_inputs]
    if part is not None:
        return ingest_part(inputs, part, cfg.out.ingest_part(part), on_error=opts.on_error,
                           chunk_bytes=opts.chunk_bytes, bucket_bytes=opts.bucket_bytes,
                           workers=cfg.threads, worker_kind=worker_kind)
    if merge:
        parts = [cfg.out.ingest_part(i) for i in range(len(inputs))]
        return merge_parts(inputs, parts, cfg.out_dir, on_error=opts.on_error,
                           row_group_rows=opts.row_group_rows)
    return ingest(inputs, cfg.out_dir, on_error=opts.on_error, chunk_bytes=opts.chunk_bytes,
                  row_group_rows=opts.row_group_rows, bucket_bytes=opts.bucket_bytes,
                  workers=cfg.threads, worker_kind=worker_kind)
