"""Deterministic Parquet streaming with row groups encoded in parallel.

A Parquet writer encodes one row group after another on one thread, and at UniProt scale that
encode is the long pole of the stages that write sorted outputs (it cannot start before the
sort). :class:`ParquetSink` encodes each row group as a one-row-group Parquet file on a thread
pool, keeps its column chunks and writes one footer: the row groups' metadata with their
offsets moved to where the chunks landed (:mod:`pipeline.thrift_compact`). With one row group
in flight the encoder writes straight into the output, after the chunks before it (its own
footer is read back and overwritten by the next); with more, each is encoded into a temporary
beside the output and its chunks appended in order. The file is byte for byte what one
``pyarrow`` ParquetWriter writing the same row groups writes (tested), whatever the threads.
"""

from __future__ import annotations

import io
import os
import struct
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.thrift_compact import I64, LIST, STRUCT, Field, Items, decode, encode, find

MAGIC = b"PAR1"
COMPRESSION = "zstd"
# field ids of the Parquet footer (parquet.thrift) that hold absolute file offsets
_FILE_NUM_ROWS, _FILE_ROW_GROUPS = 3, 4
_GROUP_COLUMNS, _GROUP_FILE_OFFSET = 1, 5
_CHUNK_FILE_OFFSET, _CHUNK_META = 2, 3
_CHUNK_PAGE_INDEX = (4, 6)  # offset/column index offsets: not written (write_page_index=False)
_META_OFFSETS = (9, 10, 11, 14)  # data, index, dictionary page; bloom filter


def encode_row_group(table: pa.Table, schema: pa.Schema, dest: Path | OutputTail) -> None:
    """Write ``table`` (of ``schema``) to ``dest`` as a one-row-group zstd Parquet file
    (pyarrow's default settings)."""
    with pq.ParquetWriter(dest, schema, compression=COMPRESSION) as writer:
        writer.write_table(table, max(1, table.num_rows))


class OutputTail(io.RawIOBase):
    """A writable stream into the open file ``fd`` from offset ``start``, less the first
    ``len(MAGIC)`` bytes written to it (a one-row-group Parquet file's leading magic)."""

    def __init__(self, fd: int, start: int) -> None:
        super().__init__()
        self.fd, self.end, self._skip = fd, start, len(MAGIC)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        size = len(view)
        skip = min(self._skip, size)
        self._skip -= skip
        _pwrite_all(self.fd, view[skip:], self.end)
        self.end += size - skip
        return size


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset`` (a raw write may be partial)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _copy_range(src: BinaryIO, dst: int, offset: int, count: int, dst_offset: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to ``dst`` at ``dst_offset`` (in the
    kernel where it can: no copy through this process's memory)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < count:
                n = os.copy_file_range(src.fileno(), dst, count - done, offset + done,
                                       dst_offset + done)
                if n == 0:
                    break
                done += n
        except OSError:  # not between these file systems: copy below
            pass
    src.seek(offset + done)
    while done < count:
        block = src.read(min(8 << 20, count - done))
        if not block:
            raise OSError(f"{src.name}: ended {count - done} bytes early")
        _pwrite_all(dst, block, dst_offset + done)
        done += len(block)


def _shift(fields: list[Field], ids: tuple[int, ...], delta: int) -> None:
    for f in fields:
        if f.id in ids and f.value:  # 0: not set (parquet-cpp writes ColumnChunk.file_offset 0)
            f.value += delta


def _moved_row_group(group: list[Field], delta: int) -> list[Field]:
    """A decoded RowGroup with every absolute offset moved by ``delta`` bytes."""
    _shift(group, (_GROUP_FILE_OFFSET,), delta)
    for chunk in find(group, _GROUP_COLUMNS).value.values:
        if any(find(chunk, i) is not None for i in _CHUNK_PAGE_INDEX):
            raise ValueError("Parquet page indexes are not supported by ParquetSink")
        _shift(chunk, (_CHUNK_FILE_OFFSET,), delta)
        meta = find(chunk, _CHUNK_META)
        if meta is not None:
            _shift(meta.value, _META_OFFSETS, delta)
    return group


class ParquetSink:
    """Streams Arrow tables into one zstd Parquet file in row groups of exactly
    ``row_group_rows`` (the last may be shorter), so the bytes depend neither on how the input
    was cut into tables nor on the threads (tables are cast to the first one's schema): each
    row group is encoded from one contiguous chunk
    (the encoder's pages depend on chunk boundaries) on ``pool`` (default: a pool of its own
    with one thread), at most ``depth`` at a time. Nothing is written for no rows.

    Use as a context manager, or call :meth:`close`; leaving the block on an error abandons
    the file (emptied; its path is a temporary one, :func:`pipeline.atomic.atomic_path`).
    """

    def __init__(self, path: Path, row_group_rows: int, pool: Executor | None = None,
                 depth: int = 1) -> None:
        self.path, self.row_group_rows, self.depth = path, row_group_rows, depth
        self._own_pool = pool is None
        self.pool: Executor = pool or ThreadPoolExecutor(1, thread_name_prefix="parquet-sink")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0
        self.schema: pa.Schema | None = None
        # row groups being encoded, oldest first: into the output itself (an OutputTail, one
        # in flight) or into a temporary file beside it (a Path)
        self._encoding: deque[tuple[Path | OutputTail, Future[None]]] = deque()
        self._parts = 0
        self._fd: int | None = None
        self._offset = len(MAGIC)  # where the next row group's chunks go
        self._head: list[Field] = []  # the first row group's footer: schema, key-values, creator
        self._row_groups: list[bytes] = []  # encoded: ~150 bytes per column chunk
        self._closed = False

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def write(self, table: pa.Table) -> None:
        """Queue ``table``'s rows; full row groups go to the encoders."""
        if table.num_rows == 0:
            return
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.cast(self.schema)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _output(self) -> int:
        """The output's descriptor (created, with its leading magic, on first use).

        Not opened with ``O_TRUNC``: :meth:`close` cuts the file to its footer's end anyway,
        and on ext4 truncating a file (even an empty one, as the atomic temporary is) to zero
        makes its close start writing all of it out: 0.1 s in the process for a 200 MB
        output, seen in ``strace``; left to the kernel, it writes it out in the background."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            _pwrite_all(self._fd, MAGIC, 0)
        return self._fd

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self.pending)  # zero-copy: the group slices below share it
        size = self.row_group_rows
        full = table.num_rows - (0 if final else table.num_rows % size)
        rest = table.slice(full)
        self.pending, self.pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        for start in range(0, full, size):
            while len(self._encoding) >= self.depth:  # before the gather: bounds memory
                self._append_next()
            group = table.slice(start, min(size, full - start)).combine_chunks()
            dest: Path | OutputTail
            if self.depth == 1:  # the only one in flight: straight after the chunks so far
                dest = OutputTail(self._output(), self._offset)
            else:
                # ".NAME.*.tmp" like the output's own temporary: a killed run's parts are
                # removed as stale by the next run (pipeline.atomic.remove_stale)
                dest = self.path.with_name(
                    f"{self.path.name.removesuffix('.tmp')}.rg{self._parts}.tmp")
                self._parts += 1
            self._encoding.append(
                (dest, self.pool.submit(encode_row_group, group, self.schema, dest)))
            del group

    def _append_next(self) -> None:
        """Wait for the oldest row group's encoding and take in its chunks and footer."""
        dest, future = self._encoding[0]
        future.result()
        self._encoding.popleft()
        if isinstance(dest, OutputTail):
            footer = self._footer_of(dest.fd, dest.end)
            self._take_footer(footer, dest.end - 8 - len(footer))
        else:
            self._append(dest)

    @staticmethod
    def _footer_of(fd: int, end: int) -> bytes:
        """The footer of the one-row-group Parquet file that ends at ``end`` in ``fd``."""
        (footer_len,) = struct.unpack("<I", os.pread(fd, 4, end - 8))
        footer = os.pread(fd, footer_len, end - 8 - footer_len)
        if len(footer) != footer_len:
            raise OSError(f"row group footer: {len(footer)} of {footer_len} bytes read")
        return footer

    def _take_footer(self, footer_bytes: bytes, chunks_end: int) -> None:
        """Keep the row groups of an encoded file whose chunks are now in the output, from
        ``self._offset`` to ``chunks_end`` (where the next chunks go)."""
        footer, _ = decode(footer_bytes)
        if not self._head:
            self._head = footer
        delta = self._offset - len(MAGIC)
        self._row_groups += [encode(_moved_row_group(g, delta))
                             for g in find(footer, _FILE_ROW_GROUPS).value.values]
        self._offset = chunks_end

    def _append(self, part: Path) -> None:
        """Append the column chunks of an encoded one-row-group file; keep its footer."""
        with open(part, "rb") as src:
            size = src.seek(0, os.SEEK_END)
            footer = self._footer_of(src.fileno(), size)
            body = size - 8 - len(footer) - len(MAGIC)
            _copy_range(src, self._output(), len(MAGIC), body, self._offset)
        part.unlink()
        self._take_footer(footer, self._offset + body)

    def close(self) -> None:
        """Encode what is pending, take in every row group and write the footer."""
        if self._closed:
            return
        try:
            if self.pending_rows:
                self._flush(final=True)
            while self._encoding:
                self._append_next()
            if self._fd is not None:
                footer = self._footer()
                _pwrite_all(self._fd, footer, self._offset)
                os.ftruncate(self._fd, self._offset + len(footer))  # the last row group's own
        except BaseException:
            self.abandon()
            raise
        self._finish()

    def _footer(self) -> bytes:
        fields = []
        for f in self._head:
            if f.id == _FILE_NUM_ROWS:
                f = Field(f.id, I64, self.rows)
            elif f.id == _FILE_ROW_GROUPS:
                f = Field(f.id, LIST, Items(LIST, STRUCT, self._row_groups))
            fields.append(f)
        meta = encode(fields)
        return meta + struct.pack("<I", len(meta)) + MAGIC

    def abandon(self) -> None:
        """Stop: drop what is queued, wait for what runs, delete the encoded row groups and
        empty and close the (incomplete) file."""
        for _, future in self._encoding:
            future.cancel()
        for dest, future in self._encoding:
            if not future.cancelled():
                future.exception()  # wait; its error is not the one to report
            if isinstance(dest, Path):
                dest.unlink(missing_ok=True)
        self._encoding.clear()
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no row group left in it that reads as a Parquet file
        self._finish()

    def _finish(self) -> None:
        self._closed = True
        self.pending = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._own_pool:
            self.pool.shutdown(wait=True)
