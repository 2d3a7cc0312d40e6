"""Shared test helpers: the ../shared/data location and small FASTA writers."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_FASTA = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test where it is absent (a user's clone)."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present: ../shared/data is only available in CI and dev sessions")
    return path


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
