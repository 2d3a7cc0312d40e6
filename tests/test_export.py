"""export-table: a split as (ur50_id, ur90_id, sequence) rows, on hand-made build tables."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.errors import PipelineError
from pipeline.export import export_table


def tables(out: Path, sequences: dict[str, str]) -> Path:
    """A build directory with clusters, splits and sequences (no MMseqs2 needed)."""
    out.mkdir()
    pl.DataFrame({"accession": ["A", "B", "C"], "rep90": ["UniRef90_A", "UniRef90_B", "UniRef90_C"],
                  "rep50": ["UniRef50_A", "UniRef50_A", "UniRef50_C"]}).write_parquet(
        out / "clusters.parquet")
    pl.DataFrame({"rep50": ["UniRef50_A", "UniRef50_C"], "group": ["UniRef50_A", "UniRef50_C"],
                  "split": ["train", "valid"], "pinned": [False, False]}).write_parquet(
        out / "splits.parquet")
    pl.DataFrame({"accession": list(sequences), "sequence": list(sequences.values())}
                 ).write_parquet(out / "sequences.parquet")
    return out


@pytest.mark.parametrize("fmt", ["parquet", "tsv"])
def test_a_split_is_one_row_per_uniref90_cluster(tmp_path: Path, fmt: str) -> None:
    out = tables(tmp_path / "b", {"A": "MKV", "B": "MKW", "C": "LLL"})
    dest = tmp_path / f"train.{fmt}"
    assert export_table(out, "train", dest, fmt) == 2
    rows = (pl.read_parquet(dest) if fmt == "parquet" else pl.read_csv(dest, separator="\t"))
    assert rows.rows() == [("UniRef50_A", "UniRef90_A", "MKV"), ("UniRef50_A", "UniRef90_B", "MKW")]


@pytest.mark.parametrize("fmt", ["parquet", "tsv"])
def test_a_representative_without_a_sequence_fails_and_leaves_nothing(tmp_path: Path,
                                                                      fmt: str) -> None:
    out = tables(tmp_path / "b", {"A": "MKV", "C": "LLL"})  # B's sequence is missing
    dest = tmp_path / f"train.{fmt}"
    with pytest.raises(PipelineError, match="1 UniRef90 representatives without a sequence"):
        export_table(out, "train", dest, fmt)
    assert not dest.exists()
