"""The vectorized FASTA splitting and header parsing agree with their per-record definitions."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

from pipeline.fasta import iter_raw_records, split_records
from pipeline.headers import gather_strings, parse_header_bytes, parse_headers
from pipeline.records import byte_counts, md5_hex

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


def test_header_parser_matches_the_regex_definition(kernels: str) -> None:
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
def test_split_matches_the_per_record_definition(seed: int, kernels: str) -> None:
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
    assert raw.odd_bytes == any(c <= " " and c not in "\r\n \t" for c in body)


@pytest.mark.parametrize("chunk_bytes", [1, 70_000, 1 << 20])
def test_blocks_cut_a_file_into_its_records_at_any_size(tmp_path, kernels: str,
                                                       chunk_bytes: int) -> None:
    """The reader's blocks (a carried record's end as a block of its own, the rest a view of
    the read) give every record, with its line, whatever the block size: records longer than a
    block, CRLF, blank lines, leading blank lines, no final newline."""
    rng = random.Random(3)
    records = []
    for i in range(300):
        width = rng.choice([60, 60, 80, 1])
        length = rng.choice([0, 1, 50, 400, 3000]) if i % 40 else rng.randint(70_000, 200_000)
        seq = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(length))
        lines = [seq[j : j + width] for j in range(0, len(seq), width)]
        newline = "\r\n" if i % 7 == 0 else "\n"
        blank = newline if i % 11 == 0 else ""
        records.append(f">sp|P{i:05d}|X Entry {i}{newline}" + newline.join(lines) + newline + blank)
    text = ("\n\n" + "".join(records)).rstrip("\r\n").encode()
    path = tmp_path / "records.fa"
    path.write_bytes(text)
    headers, seqs, lines = _reference_split(text.lstrip(), 3)
    got_headers, got_seqs, got_lines = [], [], []
    for raw in iter_raw_records(path, chunk_bytes):
        got_headers += [raw.header(i) for i in range(len(raw))]
        got_seqs += [raw.residues[raw.offsets[i] : raw.offsets[i + 1]].tobytes()
                     for i in range(len(raw))]
        got_lines += raw.lines.tolist()
    assert len(got_headers) == 300
    assert got_headers == headers and got_seqs == seqs and got_lines == lines


def test_byte_counts_and_gather_match_numpy(kernels: str) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 100_003, dtype=np.uint8)
    data[:5000] = 65  # a long run of one byte (the compiled counter's worst case)
    assert byte_counts(data).tolist() == np.bincount(data, minlength=256).tolist()
    assert byte_counts(data[:0]).sum() == 0
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog", np.uint8)
    start = np.array([4, 0, 40, 10, 10])
    end = np.array([9, 3, 43, 10, 15])
    assert gather_strings(text, start, end).to_pylist() == ["quick", "the", "dog", "", "brown"]


def test_compiled_record_count_is_one_plus_each_newline_gt(scan: object) -> None:
    """The count that sizes split's arrays: records start at 0 and after every "\\n>" ('>'
    inside headers, at the very start or end, and "\\r\\n" included)."""
    rng = random.Random(5)
    for _ in range(5000):
        body = bytes(rng.choice(b">\n\rA ") for _ in range(rng.randint(0, 40)))
        assert scan.count_records(np.frombuffer(body, np.uint8)) == 1 + body.count(b"\n>")


def test_compiled_header_parser_leaves_few_headers_to_the_regexes(scan: object) -> None:
    """The usual UniProtKB and UniRef headers take the fast path (the regexes are slow)."""
    from pipeline.headers import _fields_compiled

    headers = [b"sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens OX=9606 GN=HBA1",
               b"tr|A0A0|X_Y Uncharacterized protein OS=Mus musculus OX=10090 PE=4 SV=1",
               b"UniRef90_P69905 Hemoglobin subunit alpha n=123 Tax=Homo TaxID=9606 RepID=H",
               b"plain some text", b"sp|P1|A OS=" + b"x" * 300]
    data = b"".join(headers)
    lengths = np.array([len(h) for h in headers])
    start = np.r_[0, np.cumsum(lengths)[:-1]]
    fields = _fields_compiled(scan, np.frombuffer(data, np.uint8), start, start + lengths)
    assert not fields.slow.any()
    assert fields.taxid[fields.found].tolist() == [9606, 10090, 9606]
    with pytest.raises(ValueError, match="span out of range"):
        _fields_compiled(scan, np.frombuffer(data, np.uint8), start, start + 10**6)


def test_md5_matches_hashlib(kernels: str) -> None:
    rng = np.random.default_rng(5)
    lengths = [*range(130), 4999, 0, 64, 55, 56, 57, 119, 120]  # every padding case
    texts = ["".join(chr(65 + c) for c in rng.integers(0, 26, n)) for n in lengths]
    array = pa.array(texts, pa.large_string())
    # more messages than md5 lanes (lanes refill), fewer (idle lanes), none
    for part in (array, array.slice(7, 50), pa.array(texts, pa.string()), array.slice(125, 3),
                 array.slice(0, 0)):
        want = [hashlib.md5(t.encode()).hexdigest() for t in part.to_pylist()]
        got = md5_hex(part)
        assert got.type == pa.large_string() and got.to_pylist() == want


def _fnv1a_mixed(data: bytes) -> int:
    """The definition of pipeline.partition.string_hashes, one string at a time."""
    mask = (1 << 64) - 1
    x = 14695981039346656037
    for byte in data:
        x = ((x ^ byte) * 1099511628211) & mask
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & mask
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_string_hashes_match_their_definition(kernels: str) -> None:
    """Accession partition keys are the same with or without the compiled kernels (parts
    parsed apart must agree): both paths against the definition, on empty, short, long,
    non-ASCII and sliced strings."""
    from pipeline.partition import KEY_BITS, string_hashes, string_keys

    rng = random.Random(11)
    texts = ["", "P12345", "A0A0B4J2F0", "é٣", "x" * 300,
             *("".join(rng.choice("ACGT|_é") for _ in range(rng.randint(0, 40)))
               for _ in range(500))]
    array = pa.array(texts, pa.large_string())
    for part in (array, array.slice(3, 200), pa.chunked_array([array.slice(0, 9), array.slice(9)]),
                 pa.array(texts, pa.string()), array.slice(0, 0)):
        want = [_fnv1a_mixed(t.encode()) for t in part.to_pylist()]
        assert string_hashes(part).tolist() == want
        assert string_keys(part).tolist() == [w >> (64 - KEY_BITS) for w in want]
