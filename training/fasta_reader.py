"""A small streaming FASTA reader (plain or gzip) for ``embed``.

Record id = the first word of the header; residues are upper-cased and whitespace dropped. Bad
input raises ``FastaError`` naming the file, line and record.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from training.alphabet import RESIDUE_CHARS
from training.errors import UserError


class FastaError(UserError, ValueError):
    """Malformed FASTA input."""


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="ascii", errors="replace")
    return open(path, encoding="ascii", errors="replace")


def read_fasta(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """Yield ``(id, sequence)`` for each record of a FASTA file (``.gz`` detected by content)."""
    path = Path(path)
    if not path.is_file():
        raise FastaError(f"FASTA file {path} does not exist")
    record_id: str | None = None
    header_line = 0
    chunks: list[str] = []
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.startswith(">"):
                    if record_id is not None:
                        yield record_id, _finish(path, record_id, header_line, chunks)
                    words = line[1:].split()
                    if not words:
                        raise FastaError(f"{path}:{line_no}: empty FASTA header")
                    record_id, header_line, chunks = words[0], line_no, []
                elif line.strip():
                    if record_id is None:
                        raise FastaError(f"{path}:{line_no}: sequence data before the first '>'")
                    chunks.append(line)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise FastaError(f"cannot read {path}: {exc}") from exc
    if record_id is not None:
        yield record_id, _finish(path, record_id, header_line, chunks)


def _finish(path: Path, record_id: str, line_no: int, chunks: list[str]) -> str:
    sequence = "".join("".join(chunks).split()).upper()
    if sequence.endswith("*"):  # a terminal stop codon from translated sequences
        sequence = sequence[:-1]
    if not sequence:
        raise FastaError(f"{path}:{line_no}: record {record_id!r} has no residues")
    bad = set(sequence) - RESIDUE_CHARS
    if bad:
        raise FastaError(
            f"{path}:{line_no}: record {record_id!r} has characters outside the ESM alphabet: "
            + "".join(sorted(bad))
        )
    return sequence
