"""One split of a build as a flat table: (ur50_id, ur90_id, sequence), one row per UniRef90
cluster, the rows BioNeMo's ESM-2 recipes and HF ``datasets`` read (``esm2-data export-table``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.build_dir import SPLITS, BuildDir
from pipeline.errors import PipelineError
from pipeline.ids import accession_of
from pipeline.split import final_splits

FORMATS = ("parquet", "tsv")


def export_table(out_dir: str | Path, split: str, dest: str | Path,
                 fmt: str = "parquet", decontaminated: bool = False) -> int:
    """Write ``split``'s table to ``dest`` (atomically), sorted by ur50_id, ur90_id; returns the
    number of rows. Runs as a polars streaming query: memory does not grow with the build.
    ``decontaminated``: the build has ``decontaminate:`` sets, whose moved clusters (as the
    shards) are left out."""
    out = BuildDir(out_dir)
    out.require(out.sequences, out.clusters, out.splits)
    if split not in SPLITS:
        raise PipelineError(f"export-table: no split {split!r} (one of {', '.join(SPLITS)})")
    if fmt not in FORMATS:
        raise PipelineError(f"export-table: format {fmt!r} is not one of {', '.join(FORMATS)}")
    table = (
        final_splits(out, decontaminated).lazy().filter(pl.col("split") == split)
        .select("rep50")
        .join(pl.scan_parquet(out.clusters).select("rep50", "rep90").unique(), on="rep50")
        .with_columns(accession_of(90, pl.col("rep90")).alias("accession"))
        .join(pl.scan_parquet(out.sequences).select("accession", "sequence"), on="accession",
              how="left")
        .select(pl.col("rep50").alias("ur50_id"), pl.col("rep90").alias("ur90_id"), "sequence")
        .sort("ur50_id", "ur90_id")
    )
    with atomic_path(dest) as tmp:
        if fmt == "parquet":
            table.sink_parquet(tmp, compression="zstd")
        else:
            table.sink_csv(tmp, separator="\t")
    rows, missing = _rows_and_missing(Path(dest), fmt)
    if missing:
        Path(dest).unlink()
        raise PipelineError(f"{out.clusters} and {out.sequences} disagree: {missing} UniRef90 "
                            "representatives without a sequence (rerun the build)")
    return rows


def _rows_and_missing(path: Path, fmt: str) -> tuple[int, int]:
    """Rows of a written table and its rows without a sequence: from the Parquet footer (row
    counts and null-count statistics, no data read), or a scan of a TSV."""
    if fmt == "parquet":
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.names.index("sequence")
        missing = 0
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(column).statistics
            if stats is None or not stats.has_null_count:  # no statistics: count them
                return _scan_counts(pl.scan_parquet(path))
            missing += stats.null_count
        return meta.num_rows, missing
    return _scan_counts(pl.scan_csv(path, separator="\t"))


def _scan_counts(scan: pl.LazyFrame) -> tuple[int, int]:
    """Rows and null sequences of a table, by a scan."""
    return scan.select(pl.len(), pl.col("sequence").null_count()).collect().row(0)
