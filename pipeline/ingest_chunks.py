"""Parsing an input's chunks in parallel workers, handed back in the file's order.

The reader decompresses the input and cuts it into blocks of whole records
(:func:`pipeline.fasta.iter_blocks`); :func:`parse_block` splits, validates, header-parses and
hashes each block and appends its rows to the worker's own on-disk partitions. Workers are
threads (the numpy, Arrow and isal work releases the GIL; best on a few cores) or spawned
processes (no GIL; for many cores). Chunks come back in input order, so errors, rejection
examples and outputs are those of a one-worker run (the first bad record in the file is the one
reported), whatever the number or kind of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool as BrokenExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.collapse import hex_value
from pipeline.errors import InputFormatError, PipelineError
from pipeline.fasta import iter_blocks, split_records
from pipeline.partition import KEY_BITS, BucketWriter, bucket_of, group_rows, string_keys
from pipeline.records import Rejector, chunk_rows, clean

ACC_COLUMNS = ["accession", "source", "line"]
_SMALL_INPUT_CHUNKS = 2  # inputs of at most this many chunks are parsed in this process
# "auto" workers are threads up to this many: on 2 cores threads beat processes (no start-up, no
# copies between processes); beyond, the GIL-bound parts (per-record md5 calls) would cap them
MAX_AUTO_THREADS = 4


def seq_keys(table: pa.Table) -> np.ndarray:
    """Partition key of each record, by its sequence's md5 (identical sequences meet in one
    partition; partitions follow hash order): the digest's first 48 bits."""
    return hex_value(table.column("seq_hash"), 0, KEY_BITS // 4).astype(np.int64)


def acc_keys(table: pa.Table) -> np.ndarray:
    """Partition key of each record by its accession (for the duplicate-accession check)."""
    return string_keys(table.column("accession"))


@dataclass(frozen=True)
class BlockTask:
    """One block of whole records of input ``source`` (``path``), starting on ``first_line``;
    its rows go to ``n_buckets`` partitions under ``partition_dir`` (None: kept as a table)."""

    path: Path
    source: int
    on_error: str
    partition_dir: Path | None
    n_buckets: int
    body: bytes | np.ndarray
    first_line: int


@dataclass
class ParsedChunk:
    """What the reader needs of a parsed block: counts, rejections (``skip`` mode) and, for a
    single in-memory partition, the accepted rows."""

    records: int
    residues: int
    residue_counts: np.ndarray  # of the accepted records
    rejections: list[tuple[str, str]] = field(default_factory=list)
    table: pa.Table | None = None


# The partition writers of this process, by directory: a worker appends every block it parses
# to its own files, so that rows never travel back to the reader.
_WRITERS: dict[Path, tuple[BucketWriter, BucketWriter]] = {}


def parse_block(task: BlockTask) -> ParsedChunk:
    """Split, clean, validate, parse headers and hash one block; write its rows to this
    process's partitions (runs in a worker process)."""
    raw = split_records(task.body, task.first_line)
    rejections: list[tuple[str, str]] = []
    rejector = Rejector(task.path, task.on_error,
                        lambda reason, message: rejections.append((reason, message)))
    rows = chunk_rows(raw, clean(raw, rejector), task.source, rejector)
    chunk = ParsedChunk(len(raw), int(raw.offsets[-1]), rows.residue_counts, rejections)
    if task.partition_dir is None:
        chunk.table = rows.table
        return chunk
    n = task.n_buckets
    if task.partition_dir not in _WRITERS:
        task.partition_dir.mkdir(parents=True, exist_ok=True)
        _WRITERS[task.partition_dir] = (BucketWriter(task.partition_dir, "seq", n),
                                        BucketWriter(task.partition_dir, "acc", n))
    seq, acc = _WRITERS[task.partition_dir]
    table = rows.table
    seq.write_grouped(*group_rows(table, bucket_of(seq_keys(table), n), n))
    acc.write_grouped(*group_rows(table.select(ACC_COLUMNS), bucket_of(acc_keys(table), n), n))
    return chunk


def close_partitions(partition_dir: Path) -> None:
    """Finish this process's writes to ``partition_dir`` (no-op if it wrote none)."""
    writers = _WRITERS.pop(partition_dir, None)
    if writers is not None:
        try:
            writers[0].close()
        finally:
            writers[1].close()


def partition_files(root: Path, prefix: str, n_buckets: int) -> list[list[Path] | None]:
    """Per partition, the files the workers wrote under ``root`` (None: empty partition)."""
    found: list[list[Path] | None] = []
    for i in range(n_buckets):
        files = sorted(root.glob(f"w*/{prefix}-{i:05d}.arrows"))
        found.append(files or None)
    return found


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class ChunkParser:
    """Parses the blocks of one input after another in ``workers`` threads or processes
    (``kind``: thread, process or auto; the calling thread when ``workers`` <= 1 or an input
    is small). Each worker writes
    the rows it parsed to its own partition files under ``partition_root``/w<k>, or (no
    ``partition_root``) the rows come back as tables. A context manager: leaving it finishes
    every worker's files.

    Processes are spawned: a script that ingests with them must guard its entry point with
    ``if __name__ == "__main__":`` (as every multiprocessing program must).
    """

    def __init__(self, workers: int, chunk_bytes: int, partition_root: Path | None,
                 n_buckets: int, kind: str = "auto") -> None:
        self.workers = workers if workers > 0 else usable_cpus()
        self.chunk_bytes = chunk_bytes
        self.root, self.n_buckets = partition_root, n_buckets
        if kind == "auto":
            kind = "thread" if self.workers <= MAX_AUTO_THREADS else "process"
        if kind not in ("thread", "process"):
            raise ValueError(f"worker kind {kind!r}: expected thread, process or auto")
        self.kind = kind
        # one single-worker pool per worker: a block goes to the worker given the fewest bytes
        # so far (blocks differ in size: a carried record's end is a block of its own), and
        # the worker's files are closed by a task sent to that very worker
        self._pools: list[Executor] = []
        self._given = [0] * self.workers

    def __enter__(self) -> ChunkParser:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        try:
            if self.root is not None:
                try:
                    closing = [pool.submit(close_partitions, self._dir(k))
                               for k, pool in enumerate(self._pools)]
                    close_partitions(self._dir(None))  # blocks parsed in this process
                    _results(closing)
                except BaseException:
                    if exc_type is None:
                        raise  # else: the error that stopped the parse is the one to report
        finally:
            for pool in self._pools:
                pool.shutdown(wait=True, cancel_futures=exc_type is not None)
            self._pools = []

    def _dir(self, k: int | None) -> Path | None:
        """Worker ``k``'s partition directory (``None``: this process's)."""
        if self.root is None:
            return None
        return self.root / ("w-inline" if k is None else f"w{k}")

    def _pool(self, k: int) -> Executor:
        while len(self._pools) <= k:
            if self.kind == "process":
                pool: Executor = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"))
            else:
                pool = ThreadPoolExecutor(1, thread_name_prefix=f"ingest-parse-{len(self._pools)}")
            self._pools.append(pool)
        return self._pools[k]

    def parse(self, path: Path, source: int, on_error: str) -> Iterator[ParsedChunk]:
        """The parsed chunks of ``path``, in order; the first error in file order is raised."""
        blocks = iter_blocks(path, self.chunk_bytes)
        small = path.stat().st_size <= _SMALL_INPUT_CHUNKS * self.chunk_bytes
        if self.workers <= 1 or small:
            for body, line in blocks:
                yield parse_block(self._task(path, source, on_error, None, body, line))
            return
        try:
            yield from self._parse_in_pool(path, source, on_error, blocks)
        except BrokenExecutor:  # a worker process was killed (out of memory?)
            raise PipelineError(
                f"{path}: an ingest worker process died (killed: out of memory?); rerun with "
                f"fewer threads or a smaller ingest.chunk_bytes") from None

    def _parse_in_pool(self, path: Path, source: int, on_error: str,
                       blocks: Iterator[tuple[bytes, int]]) -> Iterator[ParsedChunk]:
        pending: deque[Future[ParsedChunk]] = deque()
        depth = 2 * self.workers  # blocks in flight: bounds memory, keeps every worker busy
        while True:
            try:
                body, line = next(blocks)
            except StopIteration:
                break
            except InputFormatError:  # the reader's (gzip, not FASTA): earlier records first
                _results(pending)
                raise
            k = self._given.index(min(self._given))
            self._given[k] += len(body)
            task = self._task(path, source, on_error, k, body, line)
            pending.append(self._pool(k).submit(parse_block, task))
            while len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _task(self, path: Path, source: int, on_error: str, k: int | None,
              body: bytes | np.ndarray,
              line: int) -> BlockTask:
        return BlockTask(path, source, on_error, self._dir(k), self.n_buckets, body, line)


def _results(futures: Iterable[Future]) -> None:
    """Wait for ``futures`` in order, raising the first one's error."""
    for future in futures:
        future.result()
