"""Streaming FASTA reading (plain or gzip) in large chunks, and header parsing.

The reader splits decompressed blocks into records with a handful of C-level bytes operations
per record; header fields are then parsed for a whole chunk at once with polars expressions.
Decompression runs in a background thread (igzip releases the GIL), so it overlaps parsing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

import polars as pl
from isal import igzip, isal_zlib

from pipeline.errors import InputFormatError

GZIP_MAGIC = b"\x1f\x8b"
_STRIP = b"\r\n \t"
_READ_BLOCK = 4 << 20


@dataclass(frozen=True)
class RawRecords:
    """One chunk of records: headers (without '>'), sequences (lines joined), header lines."""

    headers: list[bytes]
    sequences: list[bytes]
    lines: list[int]


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


def _split(body: bytes, first_line: int) -> RawRecords:
    records = body.split(b"\n>")
    records[0] = records[0][1:]
    headers, sequences, newlines = [], [], []
    for rec in records:
        header, _, seq = rec.partition(b"\n")
        headers.append(header.rstrip(_STRIP))
        sequences.append(seq.translate(None, _STRIP))
        newlines.append(rec.count(b"\n") + 1)
    lines = [first_line, *accumulate(newlines, initial=first_line)][1:-1]
    return RawRecords(headers, sequences, lines)


def iter_raw_records(path: str | Path, chunk_bytes: int = 16 << 20) -> Iterator[RawRecords]:
    """Yield the records of a FASTA file in chunks of about ``chunk_bytes`` decompressed bytes.

    Raises :class:`InputFormatError` for a file that is not FASTA or a damaged gzip stream.
    """
    path = Path(path)
    carry = b""
    line = 1
    started = False
    for block in _prefetch(_read_blocks(path, max(chunk_bytes, 1 << 16))):
        buf = carry + block if carry else block
        if not started:
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
            buf, started = stripped, True
        cut = buf.rfind(b"\n>")
        if cut <= 0:
            carry = buf
            continue
        body, carry = buf[:cut], buf[cut + 1 :]
        chunk = _split(body, line)
        line += body.count(b"\n") + 1
        yield chunk
    if carry.strip():
        yield _split(carry.rstrip(b"\r\n") if carry.endswith(b"\n") else carry, line)
    elif not started:
        raise InputFormatError(f"{path}: empty file (no FASTA records)")


# Header grammar ---------------------------------------------------------------------------------
# UniProtKB: >sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens OX=9606 GN=HBA1 PE=1 SV=2
# UniRef:    >UniRef90_P69905 Hemoglobin subunit alpha n=123 Tax=Homo sapiens TaxID=9606 RepID=...
# plain:     >id free text
_FIRST = r"^(\S*)"
_UNIPROTKB = r"^(sp|tr)\|[^|]+\|"
_UNIREF = r"^UniRef(50|90|100)_\S+$"


def parse_headers(headers: pl.Series) -> pl.DataFrame:
    """Parse a Series of header strings into accession, db, entry name, description, taxid.

    ``db`` is ``sp``/``tr`` for UniProtKB, ``UniRef50``/``UniRef90``/``UniRef100`` for UniRef,
    and empty for plain headers. Unknown ``KEY=value`` fields are tolerated; a missing taxid is
    null.
    """
    first = pl.col("header").str.extract(_FIRST, 1)
    rest = pl.col("header").str.replace(r"^\S*\s*", "").str.strip_chars()
    is_kb = first.str.contains(_UNIPROTKB)
    is_uniref = first.str.contains(_UNIREF)
    parts = first.str.split("|")
    return pl.DataFrame({"header": headers}).select(
        pl.when(is_kb)
        .then(parts.list.get(1, null_on_oob=True))
        .when(is_uniref)
        .then(first.str.replace(r"^UniRef\d+_", ""))
        .otherwise(first)
        .alias("accession"),
        pl.when(is_kb)
        .then(parts.list.get(0, null_on_oob=True))
        .when(is_uniref)
        .then(pl.lit("UniRef") + first.str.extract(r"^UniRef(\d+)_", 1))
        .otherwise(pl.lit(""))
        .alias("db"),
        pl.when(is_kb)
        .then(rest.str.replace(r"(^|\s+)OS=.*$", ""))
        .when(is_uniref)
        .then(rest.str.replace(r"(^|\s+)n=\d+(\s.*)?$", ""))
        .otherwise(rest)
        .alias("description"),
        pl.coalesce(
            rest.str.extract(r"(?:^|\s)OX=(\d+)", 1),
            rest.str.extract(r"(?:^|\s)TaxID=(\d+)", 1),
        )
        .cast(pl.Int64, strict=False)
        .alias("taxid"),
    )
