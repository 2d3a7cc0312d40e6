from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.mmseqs import MMseqs, MMseqsError, find_mmseqs, mmseqs_version


def test_bundled_binary_runs() -> None:
    binary = find_mmseqs()
    assert binary.name == "mmseqs" and binary.is_file()
    assert re.fullmatch(r"[0-9a-f]{40}|\d+\.[0-9a-f]+", mmseqs_version(binary))


def test_configured_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(MMseqsError, match="not found or not executable"):
        find_mmseqs(str(tmp_path / "mmseqs"))


def test_failure_quotes_the_log_tail(tmp_path: Path) -> None:
    mm = MMseqs.create(None, 1, tmp_path / "logs" / "x.log")
    with pytest.raises(MMseqsError) as err:
        mm.run("createdb", tmp_path / "missing.fasta", tmp_path / "db", threads=False)
    message = str(err.value)
    assert message.startswith("mmseqs createdb failed (exit ")
    assert str(tmp_path / "logs" / "x.log") in message
    assert "missing.fasta" in message  # the tail names what went wrong
    assert "\n" not in message
