"""Streaming FASTA reading (plain or gzip) in large chunks.

The reader splits decompressed blocks into records in one compiled pass over the whole chunk
(``pipeline/_scan.c``; numpy operations where it is not built; no per-record Python work):
record boundaries, header spans, line numbers, and the sequences joined into one residue buffer
with offsets (header fields: :mod:`pipeline.headers`). Decompression runs in a background thread
(igzip releases the GIL), so it overlaps parsing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from isal import igzip, isal_zlib

from pipeline import kernels
from pipeline.errors import InputFormatError

GZIP_MAGIC = b"\x1f\x8b"
_STRIP = b"\r\n \t"
_READ_BLOCK = 4 << 20


@dataclass(frozen=True)
class RawRecords:
    """One chunk of records, as arrays over the chunk's bytes (no per-record Python objects).

    Record ``i`` has its header (without '>', right-stripped of ``\\r\\n \\t``) at
    ``data[header_start[i]:header_end[i]]`` and starts on line ``lines[i]``; its sequence (lines
    joined, ``\\r\\n \\t`` removed, case kept) is ``residues[offsets[i]:offsets[i + 1]]``.
    ``odd_bytes`` is true when the chunk holds control bytes other than ``\\t\\n\\r``.
    """

    data: np.ndarray
    header_start: np.ndarray
    header_end: np.ndarray
    lines: np.ndarray
    residues: np.ndarray
    offsets: np.ndarray
    odd_bytes: bool
    next_line: int  # the line after the chunk's last, counting the '\n' that ended it

    def __len__(self) -> int:
        return len(self.lines)

    def header(self, i: int) -> bytes:
        return self.data[self.header_start[i] : self.header_end[i]].tobytes()


def open_binary(path: Path) -> BinaryIO:
    """Open a FASTA file for reading bytes, transparently decompressing gzip."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - returned to the caller
    except FileNotFoundError:
        raise InputFormatError(f"{path}: no such file") from None
    except OSError as err:
        raise InputFormatError(f"{path}: cannot open: {err.strerror}") from None
    if fh.peek(2)[:2] == GZIP_MAGIC:
        return igzip.IGzipFile(fileobj=fh, mode="rb")  # type: ignore[return-value]
    return fh


def _read_blocks(path: Path, block: int) -> Iterator[bytes]:
    with open_binary(path) as fh:
        try:
            while data := fh.read(block):
                yield data
        except EOFError:
            raise InputFormatError(
                f"{path}: truncated gzip stream (the file ended before the end-of-stream marker)"
            ) from None
        except (OSError, zlib.error, isal_zlib.error) as err:
            raise InputFormatError(f"{path}: corrupt gzip stream: {err}") from None


def _prefetch(it: Iterator[bytes], depth: int = 3) -> Iterator[bytes]:
    """Run ``it`` in a background thread, ``depth`` items ahead."""
    q: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(("item", item))
            q.put(("end", None))
        except BaseException as err:  # handed to the consumer
            q.put(("error", err))

    thread = threading.Thread(target=work, name="fasta-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value  # type: ignore[misc]
            elif kind == "end":
                return
            else:
                raise value  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)


_WHITESPACE = np.zeros(256, bool)  # the bytes dropped from sequence lines
_WHITESPACE[list(_STRIP)] = True
_MAX_STRIP_STEPS = 8


def split_records(body: bytes | np.ndarray, first_line: int) -> RawRecords:
    """Split ``body`` (bytes, or a uint8 array; starting with '>') into records, as
    ``body.split(b"\\n>")`` would (one compiled pass; the numpy twin without it)."""
    scan = kernels.SCAN
    if scan is None:
        return _split_records_numpy(body, first_line)
    b = np.frombuffer(body, np.uint8)
    n = scan.count_records(b)
    hs, he, lines = (np.empty(n, np.int64) for _ in range(3))
    offsets = np.empty(n + 1, np.int64)
    residues = np.empty(len(b), np.uint8)
    n_residues, newlines, odd = scan.split(b, hs, he, lines, offsets, residues)
    lines += first_line
    return RawRecords(b, hs, he, lines, residues[:n_residues], offsets, odd,
                      first_line + newlines + 1)


def _split_records_numpy(body: bytes | np.ndarray, first_line: int) -> RawRecords:
    """:func:`split_records` in numpy operations over the whole chunk."""
    b = np.frombuffer(body, np.uint8)
    n = len(b)
    low = np.flatnonzero(b <= 32)  # whitespace and control bytes: few, and sorted
    low_bytes = b[low]
    is_ws = _WHITESPACE[low_bytes]
    odd = not is_ws.all()
    drop = low[is_ws] if odd else low
    nl = low[low_bytes == 10]
    after = nl + 1
    after = after[after < n]
    starts = np.concatenate(([0], after[b[after] == 62])).astype(np.int64)
    ends = np.append(starts[1:], n)  # record i spans [starts[i], ends[i]); '\n' at ends-1
    stop = np.append(starts[1:] - 1, n)  # end of the record's text (before the '\n>')
    hs = starts + 1
    h = np.minimum(np.append(nl, n)[np.searchsorted(nl, hs)], stop)  # header line end
    q = np.minimum(h + 1, ends)  # sequence region [q, ends)
    he = _rstrip(b, hs, h)
    lines = first_line + np.searchsorted(nl, starts).astype(np.int64)
    dropped = np.searchsorted(drop, ends) - np.searchsorted(drop, q)
    lengths = (ends - q) - dropped
    offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    segments = np.column_stack([q - starts, ends - q]).ravel()
    in_seq = np.repeat(np.tile(np.array([False, True]), len(starts)), segments)
    keep = in_seq & (~_WHITESPACE[b] if odd else b > 32)
    residues = b[keep]
    assert len(residues) == offsets[-1]
    return RawRecords(b, hs, he, lines, residues, offsets, odd, first_line + len(nl) + 1)


def _rstrip(b: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Ends of ``b[start:end].tobytes().rstrip(b"\\r\\n \\t")`` for each span."""
    end = end.copy()
    active = np.flatnonzero(end > start)
    for _ in range(_MAX_STRIP_STEPS):
        if not len(active):
            return end
        active = active[_WHITESPACE[b[end[active] - 1]]]
        end[active] -= 1
        active = active[end[active] > start[active]]
    for i in active.tolist():  # long whitespace runs: rare
        end[i] = start[i] + len(b[start[i] : end[i]].tobytes().rstrip(_STRIP))
    return end


def count_newlines(data: bytes, start: int, end: int) -> int:
    """``data.count(b"\\n", start, end)``, without holding the GIL where the kernels are built
    (iter_blocks counts each block's lines while the parse threads run)."""
    scan = kernels.SCAN
    return scan.count_newlines(memoryview(data)[start:end]) if scan is not None else \
        data.count(b"\n", start, end)


def iter_blocks(
    path: str | Path, chunk_bytes: int = 8 << 20
) -> Iterator[tuple[bytes | np.ndarray, int]]:
    """Yield ``(body, first_line)``: the file cut into blocks of whole records (each starting
    with '>', bytes or a uint8 array), about ``chunk_bytes`` decompressed bytes each, and the
    line each block starts on.
    :func:`split_records` makes the records of a block (in any process).

    Raises :class:`InputFormatError` for a file that is not FASTA or a damaged gzip stream.
    """
    path = Path(path)
    carry = b""
    line = 1
    started = False
    for block in _prefetch(_read_blocks(path, max(chunk_bytes, 1 << 16))):
        if not started:
            buf = carry + block if carry else block
            stripped = buf.lstrip()
            if not stripped:
                carry = b""
                line += buf.count(b"\n")
                continue
            line += buf[: len(buf) - len(stripped)].count(b"\n")
            if not stripped.startswith(b">"):
                snippet = stripped[:20].decode("utf-8", "replace").splitlines()[0]
                raise InputFormatError(
                    f"{path}: line {line}: not a FASTA file (expected a '>' header, "
                    f"found {snippet!r})"
                )
            carry, block, started = b"", stripped, True
        # ``carry`` is the start of a record, ``block`` goes on from it: the carried record's
        # end is a small block of its own, and the rest a view of ``block`` (no copy of the
        # whole block under the GIL)
        start = 0
        if carry:
            first = block.find(b"\n>")
            if first < 0:  # a record longer than the block
                carry += block
                continue
            head = carry + block[:first]
            yield head, line
            line += head.count(b"\n") + 1
            start = first + 1
        cut = block.rfind(b"\n>")
        if cut < start:
            carry = block[start:]
            continue
        yield np.frombuffer(block, np.uint8, count=cut - start, offset=start), line
        line += count_newlines(block, start, cut) + 1
        carry = block[cut + 1 :]
    if carry.strip():
        yield (carry.rstrip(b"\r\n") if carry.endswith(b"\n") else carry), line
    elif not started:
        raise InputFormatError(f"{path}: empty file (no FASTA records)")


def iter_raw_records(path: str | Path, chunk_bytes: int = 8 << 20) -> Iterator[RawRecords]:
    """Yield the records of a FASTA file in chunks of about ``chunk_bytes`` decompressed bytes.

    Raises :class:`InputFormatError` for a file that is not FASTA or a damaged gzip stream.
    """
    for body, line in iter_blocks(path, chunk_bytes):
        yield split_records(body, line)
