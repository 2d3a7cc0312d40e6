"""On-disk partitioning, for bounded-memory stages."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline.arrow_buffers import string_buffers, to_arrow

if TYPE_CHECKING:
    import polars as pl

# Partitions are scratch: uncompressed Arrow IPC streams write and read at memory speed, and
# each write appends one record batch to its partition's file.
_IPC_OPTIONS = ipc.IpcWriteOptions(compression=None)


def read_partition(path: Path | list[Path], columns: list[str] | None = None) -> pl.DataFrame:
    """A partition written by :class:`BucketWriter`: one file, or several (concatenated)."""
    import polars as pl

    if isinstance(path, list):
        return pl.concat([read_partition(p, columns) for p in path], rechunk=False)
    return pl.read_ipc_stream(path, columns=columns)


def read_partition_table(path: Path | list[Path]) -> pa.Table:
    """A partition written by :class:`BucketWriter` as an Arrow table, its buffers mapped from
    the page cache (reading them copied every byte into fresh memory: the ingest benchmark's
    partitions, 485 MB, took 0.19 s to read and under 0.03 s to map, and its final phase
    went 1.48 -> 1.37 s)."""
    paths = path if isinstance(path, list) else [path]
    tables = []
    for p in paths:
        with pa.memory_map(str(p)) as fh:
            tables.append(ipc.open_stream(fh).read_all())
    return pa.concat_tables(tables)


class BucketWriter:
    """Appends chunk tables to ``n`` on-disk partitions chosen by a key expression.

    Encoding and writing run in one background thread (Arrow releases the GIL), so they overlap
    the caller's work on the next chunk; at most ``depth`` chunks wait, which bounds memory.
    Each partition receives its rows in the order ``write`` was called, whatever the timing.
    Read a partition back with :func:`read_partition`.
    """

    def __init__(self, root: Path, prefix: str, n: int, depth: int = 2) -> None:
        self.paths = [root / f"{prefix}-{i:05d}.arrows" for i in range(n)]
        self.writers: list[ipc.RecordBatchStreamWriter | None] = [None] * n
        self.files: list[pa.NativeFile | None] = [None] * n
        self.n = n
        self.depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{prefix}-writer")
        self._pending: deque[Future[None]] = deque()

    def __enter__(self) -> BucketWriter:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        """Always drain and close (no writer thread outlives the scratch directory)."""
        try:
            self.close()
        except BaseException:
            if exc_type is None:
                raise

    def write(self, df: pl.DataFrame, bucket: pl.Expr) -> None:
        """Append ``df``'s rows, each to the partition ``bucket`` gives it."""
        if df.is_empty():
            return
        if self.n == 1:
            parts = [(0, df)]
        else:
            split = df.with_columns(bucket.alias("_b")).partition_by(
                "_b", as_dict=True, include_key=False
            )
            parts = [(int(b), part) for (b,), part in split.items()]
        self._submit([(i, part.to_arrow()) for i, part in parts])

    def write_grouped(self, table: pa.Table, counts: np.ndarray) -> None:
        """Append a table whose rows are already grouped by partition: ``counts[i]`` rows of
        partition ``i``, in partition order (what :func:`group_rows` makes)."""
        ends = np.cumsum(counts).tolist()
        starts = [0, *ends[:-1]]
        self._submit([(i, table.slice(a, b - a))
                      for i, (a, b) in enumerate(zip(starts, ends, strict=True)) if b > a])

    def _submit(self, parts: list[tuple[int, pa.Table]]) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()  # re-raises a failed write here
        self._pending.append(self._pool.submit(self._append_all, parts))

    def _append_all(self, parts: list[tuple[int, pa.Table]]) -> None:
        for i, table in parts:
            if self.writers[i] is None:
                self.files[i] = pa.OSFile(str(self.paths[i]), "wb")
                self.writers[i] = ipc.new_stream(self.files[i], table.schema, options=_IPC_OPTIONS)
            self.writers[i].write_table(table)

    def close(self) -> list[Path | None]:
        """Finish the queued writes and close every partition; paths (None: empty partition).

        Idempotent: after the first call it only returns the paths again.
        """
        error: BaseException | None = None
        while self._pending:
            try:
                self._pending.popleft().result()
            except BaseException as err:  # keep closing; raise the first failure at the end
                error = error or err
        self._pool.shutdown(wait=True)
        out: list[Path | None] = []
        for i, (path, writer) in enumerate(zip(self.paths, self.writers, strict=True)):
            if writer is not None:
                try:
                    writer.close()
                finally:
                    self.files[i].close()
                self.writers[i] = self.files[i] = None
                out.append(path)
            else:
                out.append(path if path.is_file() else None)
        if error is not None:
            raise error
        return out


def group_rows(table: pa.Table, keys: np.ndarray, n: int) -> tuple[pa.Table, np.ndarray]:
    """``table`` with its rows grouped by partition ``keys`` (stable: each partition keeps the
    rows' order), and the row count of each of the ``n`` partitions; for
    :meth:`BucketWriter.write_grouped`."""
    counts = np.bincount(keys, minlength=n)
    # a stable sort of small integers is a radix sort (an int64 one a timsort: 15x slower)
    order = np.argsort(keys.astype(np.min_scalar_type(max(n - 1, 0))), kind="stable")
    return table.take(to_arrow(order)), counts


# Partition keys are 48-bit fractions of the key space: partition i of n holds the keys in
# [i/n, (i+1)/n), so partitions follow key order, and a partition splits into ordered pieces by
# the key's next bits. Writes fan out to at most MAX_FANOUT files at once (open files, and the
# size of each appended batch, stay bounded); a plan for more partitions splits each on disk.
KEY_BITS = 48
MAX_FANOUT = 128
_KEY_MASK = (1 << KEY_BITS) - 1


_FNV_OFFSET, _FNV_PRIME = np.uint64(14695981039346656037), np.uint64(1099511628211)
_MIX = (np.uint64(30), np.uint64(0xBF58476D1CE4E5B9), np.uint64(27), np.uint64(0x94D049BB133111EB),
        np.uint64(31))


def string_hashes(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string (uint64): FNV-1a, then SplitMix64's finalizer; compiled
    (``pipeline/_scan.c``) or in numpy, the same values either way (parts parsed apart, one
    of them without the compiled kernels, must agree)."""
    from pipeline import kernels

    data, offsets = string_buffers(strings)
    out = np.empty(len(offsets) - 1, np.uint64)
    if kernels.SCAN is not None:
        kernels.SCAN.string_hashes(data, np.ascontiguousarray(offsets), out)
        return out
    starts, lengths = offsets[:-1], np.diff(offsets)
    out[:] = _FNV_OFFSET
    for j in range(int(lengths.max(initial=0))):  # byte j of every string that has one
        live = np.flatnonzero(lengths > j)
        out[live] = (out[live] ^ data[starts[live] + j]) * _FNV_PRIME
    s1, m1, s2, m2, s3 = _MIX
    out ^= out >> s1
    out *= m1
    out ^= out >> s2
    out *= m2
    out ^= out >> s3
    return out


def string_keys(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 48-bit partition key per string: the top bits of :func:`string_hashes` (no Polars:
    the parse workers key accessions before it has loaded)."""
    return (string_hashes(strings) >> np.uint64(64 - KEY_BITS)).astype(np.int64)


def hashed_keys(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 48-bit partition key per string: the top bits of its Polars hash (seed 0)."""
    import polars as pl

    hashes = pl.Series(strings).hash(seed=0).to_numpy()
    return (hashes >> np.uint64(64 - KEY_BITS)).astype(np.int64)


def bucket_of(keys: np.ndarray, n: int) -> np.ndarray:
    """The partition (of ``n``) of each 48-bit key."""
    return (keys.astype(np.int64) * n) >> KEY_BITS


def within(keys: np.ndarray, n: int) -> np.ndarray:
    """Each key's place inside its partition of ``n``, as a 48-bit key again."""
    return (keys.astype(np.int64) * n) & _KEY_MASK


def fanout(planned: int) -> int:
    """Partitions written at once for a plan of ``planned`` partitions."""
    return max(1, min(planned, MAX_FANOUT))


def split_factor(planned: int) -> int:
    """Pieces each written partition splits into so that pieces are the planned size."""
    return max(1, math.ceil(planned / fanout(planned)))


def iter_split(
    parts: Sequence[Path | list[Path] | pa.Table | None], planned: int,
    key: Callable[[pa.Table], np.ndarray], scratch: Path, batch_rows: int = 1 << 16,
    consume: bool = False,
) -> Iterator[pa.Table]:
    """The rows of each partition (``fanout(planned)`` written ones, in order) as tables of
    about the planned size, in key order: a partition is split on disk into
    ``split_factor(planned)`` pieces by ``key``'s bits below the partition's own, read back one
    at a time. Empty partitions and pieces are skipped. With ``consume``, a partition's files
    are deleted once read (scratch: the disk they take is freed as the work goes, and no
    directory of them is left to delete at the end)."""
    factor = split_factor(planned)
    n = fanout(planned)
    for part in parts:
        if part is None:
            continue
        if isinstance(part, pa.Table):
            yield part
            continue
        if factor == 1:
            table = read_partition_table(part)  # mapped: the pages outlive the file's name
            if consume:
                _unlink(part)
            yield table
            del table  # its mapping goes before the next partition's is made
            continue
        piece_dir = scratch / "split"
        piece_dir.mkdir(parents=True, exist_ok=True)
        with BucketWriter(piece_dir, "piece", factor) as pieces:
            for batch in _batches(part, batch_rows):
                table = pa.Table.from_batches([batch])
                pieces.write_grouped(
                    *group_rows(table, bucket_of(within(key(table), n), factor), factor))
        if consume:
            _unlink(part)
        for path in pieces.close():
            if path is not None:
                table = read_partition_table(path)
                path.unlink()
                yield table


def _unlink(paths: Path | list[Path]) -> None:
    for p in paths if isinstance(paths, list) else [paths]:
        p.unlink()


def _batches(paths: Path | list[Path], rows: int) -> Iterator[pa.RecordBatch]:
    """The record batches of partition file(s), re-cut to about ``rows`` rows each."""
    for p in paths if isinstance(paths, list) else [paths]:
        with pa.OSFile(str(p)) as fh:
            reader = ipc.open_stream(fh)
            pending: list[pa.RecordBatch] = []
            count = 0
            for batch in reader:
                pending.append(batch)
                count += batch.num_rows
                if count >= rows:
                    yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
                    pending, count = [], 0
            if count:
                yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
