"""The vectorized FASTA splitting and header parsing agree with their per-record definitions."""

from __future__ import annotations

import random

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipeline.fasta import split_records
from pipeline.headers import parse_header_bytes, parse_headers

_PIECES = [
    "sp|", "tr|", "|", "UniRef50_", "UniRef90_", "UniRef100_", "UniRef1000_", "P12345", "A0A0",
    " ", "  ", " " * 25, "\t", "\r", "\x0b", "OS=", " OS=", " OS=Homo sapiens", " OX=", " OX=9606",
    " OX=x", " OX=" + "9" * 19, " OX=" + "0" * 17 + "7", " TaxID=", " TaxID=10090", " n=",
    " n=3", " n=12a", " n=" + "1" * 30, "n=5", "=", "x", "_HUMAN", " Tax=Mus", " RepID=Q",
    " GN=abc", " PE=1", "é", "\u00a0", "\x7f", "\xff", "٣", "(Fragment)", "1", "12",
]


_FIRST_WORDS = ["sp|P1|N_H", "tr|A0A0|X_Y", "sp||x", "tr|P|", "sp|Q", "UniRef90_P1",
                "UniRef100_UPI1", "UniRef50_", "plain", "", " "]


def _random_header(rng: random.Random) -> bytes:
    text = rng.choice(_FIRST_WORDS) if rng.random() < 0.7 else ""
    text += "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 9)))
    raw = text.encode("latin-1" if rng.random() < 0.1 else "utf-8", "replace")
    return raw.rstrip(b"\r\n \t")


def test_header_parser_matches_the_regex_definition() -> None:
    rng = random.Random(7)
    headers = [h for h in (_random_header(rng) for _ in range(20_000)) if h]
    headers += [b"sp|P1|A OS=x", b"tr|Q|B", b"sp||C", b"UniRef90_X n=1", b"UniRef100_", b"a b"]
    data = b"\n".join(headers)
    lengths = np.array([len(h) for h in headers])
    start = np.r_[0, np.cumsum(lengths + 1)[:-1]]
    got = pl.from_arrow(parse_header_bytes(np.frombuffer(data, np.uint8), start, start + lengths))
    want = parse_headers(
        pl.Series("header", [h.decode("utf-8", "replace") for h in headers], dtype=pl.String)
    )
    assert_frame_equal(got, want)


def _reference_split(body: bytes, first_line: int) -> tuple[list, list, list]:
    records = body.split(b"\n>")
    records[0] = records[0][1:]
    headers, seqs, lines, line = [], [], [], first_line
    for rec in records:
        header, _, seq = rec.partition(b"\n")
        headers.append(header.rstrip(b"\r\n \t"))
        seqs.append(seq.translate(None, b"\r\n \t"))
        lines.append(line)
        line += rec.count(b"\n") + 1
    return headers, seqs, lines


@pytest.mark.parametrize("seed", range(20))
def test_split_matches_the_per_record_definition(seed: int) -> None:
    rng = random.Random(seed)
    parts = [">", "\n", "\r\n", "\n>", " ", "\t", "MKV", "acd*", "*", "\x0b", "\x00", "é", "x y"]
    body = ">" + "".join(rng.choice(parts) for _ in range(rng.randint(0, 400)))
    raw = split_records(body.encode(), 5)
    headers, seqs, lines = _reference_split(body.encode(), 5)
    assert [raw.header(i) for i in range(len(raw))] == headers
    assert [raw.residues[raw.offsets[i] : raw.offsets[i + 1]].tobytes()
            for i in range(len(raw))] == seqs
    assert raw.lines.tolist() == lines
    assert raw.next_line == 5 + body.count("\n") + 1
