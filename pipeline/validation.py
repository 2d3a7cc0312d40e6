"""The fixed validation set: UniRef50 representative sequences drawn from the valid split.

Clusters of the valid split are ranked by a seeded hash of their id and the first ``size`` are
kept, in that order, so the set is a deterministic function of (clusters, splits, seed, size)
and a new release that keeps a cluster keeps its place. Written as FASTA, Parquet and one
WebDataset shard in the cluster schema of :mod:`pipeline.shards` (one member per sample).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl

from pipeline.atomic import atomic_dir, write_text_atomic
from pipeline.build_dir import BuildDir
from pipeline.config import BuildConfig, ValidationConfig
from pipeline.errors import PipelineError
from pipeline.ids import UNIREF90, accession_of, entries_sum, order_key
from pipeline.shards import ARRAYS, ClusterSample, ShardWriter

FILES = ("validation.fasta", "validation.parquet", "validation-000000.tar", "index.json",
         *(file for file, _ in ARRAYS.values()))


log = logging.getLogger(__name__)


def select_validation(out: BuildDir, cfg: ValidationConfig, seed: int) -> tuple[pl.DataFrame, int]:
    """(cluster, accession, entries, member_entries, length, sequence) of the chosen clusters,
    and the number of valid clusters there were to choose from."""
    splits = pl.read_parquet(out.splits, columns=["rep50", "split"])
    valid = splits.filter(pl.col("split") == "valid").get_column("rep50")
    if valid.is_empty():  # a result (e.g. split.valid_fraction: 0), not an error
        log.warning("%s: the valid split is empty: the validation set has no sequence",
                    out.splits)
    chosen = (
        pl.DataFrame({"cluster": valid})
        .with_columns(
            pl.col("cluster")
            .map_elements(lambda c: order_key(seed, f"validation:{c}"), return_dtype=pl.String)
            .alias("key")
        )
        .sort("key")
        .head(cfg.size)
        .with_columns(accession_of(50, pl.col("cluster")).alias("accession"))
    )
    clusters = pl.read_parquet(out.clusters).filter(
        pl.col("rep50").is_in(chosen.get_column("cluster").implode())
    )
    count = entries_sum(clusters.columns)
    entries = clusters.group_by("rep50").agg(count.alias("entries")).rename({"rep50": "cluster"})
    member = (
        clusters.filter(accession_of(90, pl.col("rep90")) == accession_of(50, pl.col("rep50")))
        .group_by("rep50").agg(count.alias("member_entries")).rename({"rep50": "cluster"})
    )
    seqs = pl.read_parquet(out.sequences, columns=["accession", "sequence"])
    table = (
        chosen.join(entries, on="cluster", how="left")
        .join(member, on="cluster", how="left")
        .join(seqs, on="accession", how="left")
        .sort("key")
        .select("cluster", "accession", pl.col("entries").cast(pl.Int64),
                pl.col("member_entries").cast(pl.Int64),
                pl.col("sequence").str.len_bytes().cast(pl.Int64).alias("length"), "sequence")
    )
    return table, len(valid)


def write_validation(out_dir: str | Path, cfg: ValidationConfig, seed: int) -> dict:
    """Write ``<out>/validation/`` and return its summary."""
    out = BuildDir(out_dir)
    out.require(out.sequences, out.clusters, out.splits)
    table, available = select_validation(out, cfg, seed)
    if table.get_column("sequence").null_count():
        raise PipelineError("validation: a representative has no sequence (stale inputs?)")
    with atomic_dir(out.validation) as dest:
        with open(dest / "validation.fasta", "w", encoding="ascii") as fh:
            for cluster, seq in table.select("cluster", "sequence").iter_rows():
                fh.write(f">{cluster}\n{seq}\n")
        table.write_parquet(dest / "validation.parquet", compression="zstd")
        writer = ShardWriter(dest, "validation", max_bytes=1 << 62)
        for row in table.iter_rows(named=True):
            writer.write(ClusterSample(row["cluster"], row["entries"],
                                       [UNIREF90 + row["accession"]],
                                       [row["member_entries"]], [row["sequence"]]))
        writer.finish()
    summary = {
        "seed": seed,
        "requested": cfg.size,
        "valid_clusters_available": available,
        "sequences": table.height,
        "residues": int(table.get_column("length").sum()),
    }
    write_text_atomic(out.stats("validation"), json.dumps(summary, indent=2) + "\n")
    return summary


def run(cfg: BuildConfig) -> dict:
    """The validation stage of a build."""
    return write_validation(cfg.out_dir, cfg.validation, cfg.seed)
