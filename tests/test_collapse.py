"""The collapse of an ingest partition and its duplicate-accession check, against plain Python
definitions of the order and of the first-seen rule."""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import collapse as collapse_module
from pipeline.collapse import (
    collapse,
    collapse_order,
    duplicate_accessions,
    hex_value,
    record_keys,
)
from pipeline.errors import InputFormatError

STRING = pa.large_string()


def _partition(rows: list[tuple[str, str, str, str]], chunks: int = 1) -> pa.Table:
    """A partition table (the parse's columns) of (accession, db, sequence, seq_hash) rows, cut
    into ``chunks`` record batches as the partition files give them."""
    n = len(rows)
    columns = {
        "accession": pa.array([r[0] for r in rows], STRING),
        "db": pa.array([r[1] for r in rows], STRING),
        "description": pa.array([f"protein {i}" for i in range(n)], STRING),
        "taxid": pa.array([9606 + i % 3 for i in range(n)], pa.int64()),
        "length": pa.array([len(r[2]) for r in rows], pa.int64()),
        "sequence": pa.array([r[2] for r in rows], STRING),
        "seq_hash": pa.array([r[3] for r in rows], STRING),
        "source": pa.array([0] * n, pa.int32()),
        "line": pa.array(range(1, 2 * n, 2), pa.int64()),
    }
    table = pa.table(columns)
    if chunks == 1:
        return table
    cuts = sorted(random.Random(chunks).sample(range(1, n), chunks - 1))
    bounds = [0, *cuts, n]
    return pa.concat_tables([table.slice(a, b - a) for a, b in itertools.pairwise(bounds)])


def _md5(sequence: str) -> str:
    return hashlib.md5(sequence.encode()).hexdigest()


def _rows(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """Random records: many sequences repeated (sp and tr), and hashes that share their first
    64 bits but not the rest (made up: md5 collisions of 64 bits do not occur in tests)."""
    rng = random.Random(seed)
    pool = ["".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=rng.randint(1, 30))) for _ in range(n)]
    rows = []
    for i in range(n):
        seq = rng.choice(pool[: n // 3]) if rng.random() < 0.5 else pool[i]
        digest = _md5(seq)
        if rng.random() < 0.1:  # same first 16 digits as a fixed prefix, different rest
            digest = "0123456789abcdef" + digest[16:]
        rows.append((f"{'PQ'[i % 2]}{rng.randint(0, 10 * n):06d}x{i}", rng.choice(["sp", "tr"]),
                     seq, digest))
    return rows


@pytest.mark.parametrize("chunks", [1, 7])
def test_the_order_is_hash_then_swissprot_then_accession(chunks: int) -> None:
    rows = _rows(3000, seed=chunks)
    order, starts = collapse_order(_partition(rows, chunks))
    want = sorted(range(len(rows)), key=lambda i: (rows[i][3], rows[i][1] != "sp", rows[i][0]))
    assert order.tolist() == want
    hashes = [rows[i][3] for i in want]
    assert starts.tolist() == [i == 0 or hashes[i] != hashes[i - 1] for i in range(len(rows))]
    assert 0 < starts.sum() < len(rows)
    assert sum(h.startswith("0123456789abcdef") for h in hashes) > 100  # the tie path ran


@pytest.mark.parametrize("piece_bytes", [1 << 30, 5_000])
def test_collapse_keeps_one_row_per_sequence_and_maps_every_record(piece_bytes: int) -> None:
    rows = _rows(2000, seed=3)
    table = _partition(rows, chunks=5)
    pieces = list(collapse(table, piece_bytes))
    assert (len(pieces) > 1) == (piece_bytes < table.nbytes)
    uniques = pa.concat_tables([u for u, _ in pieces])
    records = pa.concat_tables([r for _, r in pieces])
    assert uniques.schema.names == collapse_module.SEQUENCE_COLUMNS
    assert records.schema.names == collapse_module.RECORD_COLUMNS
    assert uniques.schema.field("n_records").type == pa.int64()
    assert all(col.num_chunks == 1 for u, r in pieces for col in [*u.columns, *r.columns])

    by_hash: dict[str, list[tuple[str, str, str, str]]] = {}
    for row in sorted(rows, key=lambda r: (r[3], r[1] != "sp", r[0])):
        by_hash.setdefault(row[3], []).append(row)
    assert uniques.column("seq_hash").to_pylist() == list(by_hash)
    assert uniques.column("accession").to_pylist() == [g[0][0] for g in by_hash.values()]
    assert uniques.column("sequence").to_pylist() == [g[0][2] for g in by_hash.values()]
    assert uniques.column("n_records").to_pylist() == [len(g) for g in by_hash.values()]
    assert records.column("rep_accession").to_pylist() == [
        g[0][0] for g in by_hash.values() for _ in g]
    assert records.column("accession").to_pylist() == [r[0] for g in by_hash.values() for r in g]


def test_swissprot_represents_even_with_a_higher_accession() -> None:
    seq, digest = "MKV", _md5("MKV")
    rows = [("A1", "tr", seq, digest), ("Z9", "sp", seq, digest), ("B2", "tr", seq, digest)]
    [(uniques, records)] = list(collapse(_partition(rows), 1 << 20))
    assert uniques.column("accession").to_pylist() == ["Z9"]
    assert records.column("accession").to_pylist() == ["Z9", "A1", "B2"]
    assert records.column("rep_accession").to_pylist() == ["Z9"] * 3


def test_hex_value_reads_digits_as_big_endian_integers() -> None:
    digests = pa.array(["00" * 16, "0123456789abcdef" + "f" * 16], STRING)
    assert hex_value(digests, 0, 16).tolist() == [0, 0x0123456789ABCDEF]
    assert hex_value(digests, 16, 16).tolist() == [0, 2**64 - 1]
    assert hex_value(digests, 0, 12).tolist() == [0, 0x0123456789AB]
    with pytest.raises(ValueError, match="32 hex digits"):
        hex_value(pa.array(["abc"], STRING), 0, 2)
    for first, count in [(0, 3), (0, 18), (24, 10)]:
        with pytest.raises(ValueError, match="digits"):
            hex_value(digests, first, count)


def _acc_partition(entries: list[tuple[str, int, int]]) -> pa.Table:
    return pa.table({"accession": pa.array([e[0] for e in entries], STRING),
                     "source": pa.array([e[1] for e in entries], pa.int32()),
                     "line": pa.array([e[2] for e in entries], pa.int64())})


def test_duplicate_accessions_are_dropped_after_their_first_record(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sources = [Path("/in/a.fa"), Path("/in/b.fa")]
    parts = [_acc_partition([("P1", 1, 9), ("P2", 0, 3), ("P1", 0, 7), ("P1", 0, 20)]),
             _acc_partition([("Q5", 0, 1), ("Q6", 1, 1)])]
    seen: list[tuple[str, str]] = []
    drops = duplicate_accessions(parts, sources, lambda r, m: seen.append((r, m)))
    assert sorted(drops.tolist()) == [20, (1 << 40) | 9]
    assert seen == [
        ("duplicate_accession", "/in/a.fa: record P1 (line 20): duplicate accession "
                                "(first seen in a.fa at line 7)"),
        ("duplicate_accession", "/in/b.fa: record P1 (line 9): duplicate accession "
                                "(first seen in a.fa at line 7)"),
    ]
    with pytest.raises(InputFormatError, match=r"a\.fa: record P1 \(line 20\)"):
        duplicate_accessions(parts, sources, None)
    assert duplicate_accessions(parts[1:], sources, None).tolist() == []

    # every accession hashing alike: the candidates are still compared exactly
    monkeypatch.setattr(collapse_module, "string_hashes",
                        lambda strings: np.zeros(len(strings), np.uint64))
    assert duplicate_accessions(parts[1:], sources, None).tolist() == []
    assert sorted(duplicate_accessions(parts, sources, lambda r, m: None).tolist()) == \
        sorted(drops.tolist())


def test_record_keys_are_source_and_line() -> None:
    table = _acc_partition([("A", 0, 5), ("B", 3, 2**39)])
    assert record_keys(table).tolist() == [5, (3 << 40) | 2**39]
