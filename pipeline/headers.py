"""FASTA header parsing for whole chunks at once: accession, db, entry name, description, taxid.

``parse_headers`` (polars regexes) defines the grammar; ``parse_header_bytes`` computes the same
fields from the header bytes of a chunk (compiled, ``pipeline/_scan.c``, or numpy where that is
not built), falling back to ``parse_headers`` for unusual headers.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa

from pipeline import kernels
from pipeline.arrow_buffers import to_arrow
from pipeline.ids import UNIREF50, UNIREF90, UNIREF100

if TYPE_CHECKING:
    import polars as pl

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
    import polars as pl

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


# The same grammar, vectorized over the bytes of a chunk's headers. It covers headers of printable
# ASCII (space the only whitespace, so the regexes' \s and \d are ' ' and [0-9]); any other header
# is handed to ``parse_headers``, which stays the definition.
_KB_PREFIXES = (b"sp|", b"tr|")
_UNIREF_PREFIXES = tuple(p.encode() for p in (UNIREF50, UNIREF90, UNIREF100))
_PREFIX_WIDTH = 10
_MAX_DIGITS = 18  # longer taxids may overflow Int64: left to parse_headers
_MAX_WALK = _MAX_DIGITS + 1  # longer runs of digits or spaces: left to parse_headers
_IS_SPACE = np.zeros(256, bool)
_IS_SPACE[32] = True
_IS_DIGIT = np.zeros(256, bool)
_IS_DIGIT[48:58] = True


def gather_strings(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> pa.Array:
    """A LargeString array of ``buf[start[i]:end[i]]`` (``buf`` must hold valid UTF-8 there)."""
    lengths = end - start
    offsets = np.zeros(len(start) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    scan = kernels.SCAN
    if len(start) and lengths.sum() == end[-1] - start[0] and (start[1:] == end[:-1]).all():
        data = buf[start[0] : end[-1]]  # contiguous spans: no gather
    elif scan is not None:
        data = np.empty(int(offsets[-1]), np.uint8)
        scan.gather(buf, np.ascontiguousarray(start, np.int64),
                    np.ascontiguousarray(end, np.int64), data)
    else:
        data = buf[np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])]
    return pa.LargeStringArray.from_buffers(len(start), pa.py_buffer(offsets), pa.py_buffer(data))


def _walk(
    pad: np.ndarray, pos: np.ndarray, stop: np.ndarray, ok: np.ndarray, back: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Move each ``pos`` forward (or back) over bytes ``b`` with ``ok[b]``, never past ``stop``.

    Returns the new positions and a mask of those still moving after ``_MAX_WALK`` steps (left
    to the slow path)."""
    pos = pos.copy()
    active = np.arange(len(pos))
    for _ in range(_MAX_WALK):
        if back:
            active = active[(pos[active] > stop[active]) & ok[pad[pos[active] - 1]]]
            pos[active] -= 1
        else:
            active = active[(pos[active] < stop[active]) & ok[pad[pos[active]]]]
            pos[active] += 1
        if not len(active):
            break
    unfinished = np.zeros(len(pos), bool)
    unfinished[active] = True
    return pos, unfinished


def _first_per_row(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """For each of ``n`` rows, the first value whose row (sorted) is it, or -1."""
    out = np.full(n, -1, np.int64)
    if len(rows):
        first = np.r_[True, rows[1:] != rows[:-1]]
        out[rows[first]] = values[first]
    return out


class _Fields(NamedTuple):
    """Per header, spans into ``buf`` of its accession, db and description, its taxid (valid
    where ``found``), and ``slow``: left to :func:`parse_headers`."""

    buf: np.ndarray
    acc_start: np.ndarray
    acc_end: np.ndarray
    db_start: np.ndarray
    db_end: np.ndarray
    desc_start: np.ndarray
    desc_end: np.ndarray
    taxid: np.ndarray
    found: np.ndarray
    slow: np.ndarray


def parse_header_bytes(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> pa.Table:
    """``parse_headers`` of the headers ``data[start[i]:end[i]]`` (each decoded as UTF-8 with
    replacement), in one compiled pass (or its numpy twin) for the usual printable-ASCII
    headers; an Arrow table."""
    scan = kernels.SCAN
    f = _fields_compiled(scan, data, start, end) if scan else _fields_numpy(data, start, end)
    n = len(start)
    table = pa.table({
        "accession": gather_strings(f.buf, f.acc_start, f.acc_end),
        "db": gather_strings(f.buf, f.db_start, f.db_end),
        "description": gather_strings(f.buf, f.desc_start, f.desc_end),
        "taxid": pa.Array.from_buffers(pa.int64(), n, [
            pa.py_buffer(np.packbits(f.found, bitorder="little")), pa.py_buffer(f.taxid)]),
    })
    slow = f.slow
    if not slow.any():
        return table
    rows = np.flatnonzero(slow)
    texts = [data[start[i] : end[i]].tobytes().decode("utf-8", "replace") for i in rows.tolist()]
    import polars as pl

    slow_table = parse_headers(pl.Series("header", texts, dtype=pl.String)).to_arrow()
    order = np.concatenate([np.flatnonzero(~slow), rows])
    merged = pa.concat_tables([table.filter(to_arrow(~slow)), slow_table.cast(table.schema)])
    return merged.take(to_arrow(np.argsort(order, kind="stable"))).combine_chunks()


def _fields_compiled(scan: ModuleType, data: np.ndarray, start: np.ndarray,
                     end: np.ndarray) -> _Fields:
    """The fields in one pass of ``pipeline._scan.header_fields`` (spans into ``data``)."""
    n = len(start)
    start = np.ascontiguousarray(start, np.int64)
    spans = [np.empty(n, np.int64) for _ in range(6)]
    flags = np.empty(n, np.uint8)
    scan.header_fields(data, start, np.ascontiguousarray(end, np.int64), *spans, flags)
    acc_s, acc_e, db_e, desc_s, desc_e, taxid = spans
    return _Fields(data, acc_s, acc_e, start, db_e, desc_s, desc_e, taxid,
                   (flags & 1).astype(bool), (flags & 2).astype(bool))


def _fields_numpy(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> _Fields:
    """The fields in numpy operations over the chunk's headers (spans into their bytes, back
    to back)."""
    n = len(start)
    lengths = end - start
    gaps = start - np.r_[0, end[:-1]]
    mask = np.repeat(np.tile(np.array([False, True]), n), np.column_stack([gaps, lengths]).ravel())
    hb = data[: len(mask)][mask]  # the headers' bytes, back to back
    a = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=a[1:])
    z = a[1:]
    a = a[:-1]
    pad = np.concatenate([hb, np.zeros(_PREFIX_WIDTH + 8, np.uint8)])

    def row_of(pos: np.ndarray) -> np.ndarray:
        return np.searchsorted(a, pos, side="right") - 1

    slow = np.zeros(n, bool)
    slow[row_of(np.flatnonzero((hb < 32) | (hb > 127)))] = True

    sp = np.flatnonzero(hb == 32)
    k = np.searchsorted(sp, a)
    p1 = np.minimum(np.append(sp, len(hb))[k], z)  # end of the first word
    r0, unfinished = _walk(pad, p1, z, _IS_SPACE)  # start of the rest
    slow |= unfinished

    prefix = pad[a[:, None] + np.arange(_PREFIX_WIDTH)]
    width = p1 - a
    pipes = np.flatnonzero(hb == 124)
    p2 = np.append(pipes, len(hb))[np.searchsorted(pipes, a + 4)]
    is_kb = np.zeros(n, bool)
    for pre in _KB_PREFIXES:
        is_kb |= (prefix[:, : len(pre)] == np.frombuffer(pre, np.uint8)).all(1)
    is_kb &= (width > 3) & (prefix[:, 3] != 124) & (p2 < p1)
    uniref_len = np.zeros(n, np.int64)
    for pre in _UNIREF_PREFIXES:
        hit = (prefix[:, : len(pre)] == np.frombuffer(pre, np.uint8)).all(1) & (width > len(pre))
        uniref_len[hit] = len(pre)
    is_uniref = (uniref_len > 0) & ~is_kb

    acc_start = np.where(is_kb, a + 3, a + uniref_len * is_uniref)
    acc_end = np.where(is_kb, p2, p1)
    db_end = np.where(is_kb, a + 2, np.where(is_uniref, a + uniref_len - 1, a))

    equals = np.flatnonzero(hb == 61)

    def token(tok: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Spaces followed by ``tok`` (which ends in '=') in the same header, and their rows;
        a word after a space is where the regexes' (^|\\s) tokens can start."""
        space = equals - len(tok)
        space = space[space >= 0]
        hit = pad[space] == 32
        for i, c in enumerate(tok[:-1]):
            hit &= pad[space + 1 + i] == c
        space = space[hit]
        rows = row_of(space)
        inside = space + len(tok) < z[rows]
        return space[inside], rows[inside]

    def digit_run(pos: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """End of the run of digits starting at each ``pos`` (== pos where there is none)."""
        end, unfinished = _walk(pad, pos, z[rows], _IS_DIGIT)
        slow[rows[unfinished]] = True
        return end

    def cut_before(space: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Per row, the start of the run of spaces before its first token (or -1)."""
        first = np.r_[True, rows[1:] != rows[:-1]] if len(rows) else rows.astype(bool)
        space, rows = space[first], rows[first]
        cut, unfinished = _walk(pad, space, a[rows], _IS_SPACE, back=True)
        slow[rows[unfinished]] = True
        return _first_per_row(rows, cut, n)

    os_cut = cut_before(*token(b"OS="))
    space, rows = token(b"n=")
    pos = space + 3
    e = digit_run(pos, rows)
    valid = (e > pos) & ((e == z[rows]) | (pad[e] == 32))
    n_cut = cut_before(space[valid], rows[valid])
    desc_cut = np.where(is_kb, os_cut, np.where(is_uniref, n_cut, -1))
    desc_end = np.where(desc_cut >= 0, np.maximum(desc_cut, r0), z)

    taxid = np.zeros(n, np.int64)
    found = np.zeros(n, bool)
    for tok in (b"OX=", b"TaxID="):
        space, rows = token(tok)
        pos = space + 1 + len(tok)
        e = digit_run(pos, rows)
        ok = e > pos
        first_pos = _first_per_row(rows[ok], pos[ok], n)
        first_end = _first_per_row(rows[ok], e[ok], n)
        use = (first_pos >= 0) & ~found
        slow |= use & (first_end - first_pos > _MAX_DIGITS)
        use &= ~slow
        ps, pe = first_pos[use], first_end[use]
        val = np.zeros(len(ps), np.int64)
        for i in range(_MAX_DIGITS):
            more = ps + i < pe
            val = np.where(more, val * 10 + (pad[ps + i].astype(np.int64) - 48), val)
        taxid[use] = val
        found |= use | (first_pos >= 0)

    return _Fields(hb, acc_start, acc_end, a, db_end, np.minimum(r0, desc_end), desc_end, taxid,
                   found, slow)
