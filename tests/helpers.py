"""Shared test helpers: the ../shared/data location and small FASTA writers."""

from __future__ import annotations

import gzip
import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.generate import AMINO

REPO = Path(__file__).resolve().parents[1]
# ESM2_SHARED_DATA points the tests elsewhere; CI sets it to an empty directory for its second
# pass, which runs the suite as a user's clone (no ../shared) would.
SHARED_DATA = Path(os.environ.get("ESM2_SHARED_DATA") or REPO.parent / "shared" / "data")
SAMPLE_FASTA = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test where it is absent (a user's clone)."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present: ../shared/data is only available in CI and dev sessions")
    return path


def real_records(
    limit: int = 8, max_len: int = 300, min_len: int = 0,
    name: str = "mmseqs2_examples_query.fasta.gz",
) -> list[tuple[str, str]]:
    """Real (id, sequence) records of at least ``min_len`` residues, cropped to ``max_len``:
    from ../shared/data/NAME when present, else from the built-in reference set. Records are
    chosen by length, never by position, so a test sees the same shapes either way."""
    from pipeline.records import read_sequences
    from training.data.reference_sequences import REFERENCE_SEQUENCES

    path = SHARED_DATA / name
    records = (read_sequences(path) if path.is_file()
               else ((h.split()[0], s) for h, s in REFERENCE_SEQUENCES))
    chosen = ((rid, seq[:max_len]) for rid, seq in records if len(seq) >= min_len)
    out = list(itertools.islice(chosen, limit))
    if len(out) != limit:  # the reference set has 8 records: ask for at most that many
        raise ValueError(f"only {len(out)} real records of >= {min_len} residues, {limit} asked")
    return out


def real_sequences(
    limit: int = 8, max_len: int = 300, min_len: int = 0,
    name: str = "mmseqs2_examples_query.fasta.gz",
) -> list[str]:
    """The sequences of :func:`real_records`."""
    return [seq for _, seq in real_records(limit, max_len, min_len, name)]


def write_fasta(path: Path, text: str) -> Path:
    """Write FASTA text, gzip-compressed when the name ends in .gz."""
    data = text.encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def run_notebook(name: str) -> int:
    """Execute notebooks/NAME with nbclient (inputs come from the environment); returns the
    number of figures (image/png outputs) it produced."""
    import nbclient
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    return sum("image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def halves_of_sample(dest: Path) -> tuple[Path, Path, Path]:
    """The sample FASTA split at a record boundary into two .gz files, and their plain
    concatenation (the same text as the sample)."""
    text = gzip.decompress(SAMPLE_FASTA.read_bytes()).decode()
    cut = text.index("\n>", len(text) // 2) + 1
    first = write_fasta(dest / "part-a.fasta.gz", text[:cut])
    second = write_fasta(dest / "part-b.fasta.gz", text[cut:])
    both = write_fasta(dest / "both.fasta", text)
    return first, second, both


LETTERS = np.frombuffer(AMINO.encode(), np.uint8)  # residue index -> byte


def substitute(rng: np.random.Generator, seq: np.ndarray, identity: float) -> np.ndarray:
    """Exactly round((1 - identity) * len) substitutions, no indels: full-length pairs
    (``seq`` as residue indices into LETTERS)."""
    out = seq.copy()
    sites = rng.choice(len(seq), size=round((1 - identity) * len(seq)), replace=False)
    out[sites] = (out[sites] + rng.integers(1, 20, size=len(sites))) % 20
    return out
