"""pipeline.records: the cleaned, checked records of a FASTA file (also what embed reads)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from pipeline.errors import InputFormatError
from pipeline.records import read_sequences


def test_read_sequences(tmp_path: Path) -> None:
    path = tmp_path / "x.fasta.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(">sp|P1|A first\nmkta\nYIAK*\n\n>second\nLLV\n")
    assert list(read_sequences(path)) == [("sp|P1|A", "MKTAYIAK"), ("second", "LLV")]
    cases = [
        ("MKT\n>a\nL\n", "line 1: not a FASTA file"),
        (">a\n>b\nL\n", r"record a \(line 1\): empty sequence"),
        (">a\nMK1T\n", r"record a \(line 1\): invalid residue '1' at position 3"),
        (">\nMKT\n", "empty header"),
        ("", "empty file"),
    ]
    for text, message in cases:
        (tmp_path / "bad.fasta").write_text(text)
        with pytest.raises(InputFormatError, match=message):
            list(read_sequences(tmp_path / "bad.fasta"))
    with pytest.raises(InputFormatError, match="no such file"):
        list(read_sequences(tmp_path / "none.fasta"))
