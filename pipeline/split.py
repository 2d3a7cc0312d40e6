"""Train/valid/test assignment of whole UniRef50 clusters (no cluster in two splits)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from pipeline.atomic import atomic_path, write_text_atomic
from pipeline.build_dir import EXCLUDED, SPLITS, BuildDir
from pipeline.config import BuildConfig, SplitConfig
from pipeline.ids import uniform
from pipeline.linking import link_clusters
from pipeline.pins import group_pins, read_pin_list, read_pins, resolve_pins


def split_of(cluster_id: str, seed: int, valid: float, test: float) -> str:
    """The split of one cluster: a uniform draw from a seeded hash of its id."""
    u = uniform(seed, cluster_id)
    if u < valid:
        return "valid"
    if u < valid + test:
        return "test"
    return "train"


def assign_splits(
    groups: pl.DataFrame, cfg: SplitConfig, seed: int, clusters: pl.DataFrame
) -> tuple[pl.DataFrame, dict[str, int]]:
    """(rep50, group, split, pinned) for every UniRef50 cluster, and pin statistics.

    The split is drawn per split group (a single cluster unless linking joined several). A pin
    moves its cluster's whole group (:func:`pipeline.pins.group_pins` settles disagreements).
    """
    table = groups.sort("rep50").with_columns(
        pl.col("group")
        .map_elements(
            lambda g: split_of(g, seed, cfg.valid_fraction, cfg.test_fraction),
            return_dtype=pl.String,
        )
        .alias("split")
    )
    info = {"pinned_clusters": 0, "pins_not_in_build": 0, "conflicting_pin_groups": 0}
    sources = ([read_pins(cfg.pins)] if cfg.pins else []) + [
        read_pin_list(p) for p in cfg.pin_lists]
    if not sources:
        return table.with_columns(pl.lit(False).alias("pinned")), info
    pins = pl.concat(sources)
    resolved = resolve_pins(pins, clusters)
    info["pins_not_in_build"] = pins.join(resolved, on="id", how="anti").height
    pinned = resolved.join(table.select("rep50", "group"), on="rep50")
    info["pinned_clusters"] = pinned.get_column("rep50").n_unique()
    per_group = group_pins(pinned)
    info["conflicting_pin_groups"] = int(per_group.get_column("conflicting").sum())
    table = (
        table.join(per_group.select("group", "group_split"), on="group", how="left")
        .with_columns(
            pl.col("group_split").is_not_null().alias("pinned"),
            pl.coalesce("group_split", "split").alias("split"),
        )
        .drop("group_split")
        .sort("rep50")
    )
    return table, info


def split(
    out_dir: str | Path, cfg: SplitConfig, seed: int, threads: int = 2,
    mmseqs: str | None = None,
) -> dict:
    """Write splits.parquet (rep50, group, split, pinned) and stats/split.json."""
    out = BuildDir(out_dir)
    out.require(out.sequences, out.records, out.clusters)
    clusters = pl.read_parquet(out.clusters)
    groups, links = link_clusters(out, cfg, threads, mmseqs)
    table, info = assign_splits(groups, cfg, seed, clusters)
    with atomic_path(out.splits) as tmp:
        table.write_parquet(tmp, compression="zstd")
    counts = split_counts(cluster_sizes(out, clusters), table)
    stats = {
        "seed": seed,
        "fractions": {"valid": cfg.valid_fraction, "test": cfg.test_fraction},
        "pins": cfg.pins,
        **({"pin_lists": [p.model_dump() for p in cfg.pin_lists]} if cfg.pin_lists else {}),
        **info,
        "linking": None if cfg.link_identity is None else {
            "method": cfg.link_method, "identity": cfg.link_identity,
            **({} if cfg.link_method == "alignments" else {
                "coverage": cfg.link_coverage, "sensitivity": cfg.link_sensitivity,
                "queries": cfg.link_queries, "max_seqs": cfg.link_max_seqs}),
        },
        "cluster_links": links,
        "split_groups": table.get_column("group").n_unique(),
        "largest_group_clusters": int(table.group_by("group").len().get_column("len").max()),
        "splits": {
            name: counts.get(name, zero_counts()) for name in SPLITS
        },
        # clusters pinned out of every split (present only when some are)
        **({EXCLUDED: counts[EXCLUDED]} if EXCLUDED in counts else {}),
    }
    write_text_atomic(out.stats("split"), json.dumps(stats, indent=2) + "\n")
    return stats


COUNTS = ("uniref50_clusters", "uniref90_clusters", "sequences", "residues")


def zero_counts() -> dict[str, int]:
    """The :func:`split_counts` row of an empty split."""
    return dict.fromkeys(COUNTS, 0)


def cluster_sizes(out: BuildDir, clusters: pl.DataFrame) -> pl.DataFrame:
    """(rep50, uniref90_clusters, sequences, residues) per UniRef50 cluster of ``clusters``."""
    lengths = (
        pl.read_parquet(out.records, columns=["accession", "seq_hash"])
        .join(pl.read_parquet(out.sequences, columns=["seq_hash", "length"]), on="seq_hash")
        .select("accession", "length")
    )
    return clusters.join(lengths, on="accession").group_by("rep50").agg(
        pl.col("rep90").n_unique().alias("uniref90_clusters"),
        pl.len().alias("sequences"),
        pl.col("length").sum().alias("residues"),
    )


def split_counts(sizes: pl.DataFrame, table: pl.DataFrame) -> dict[str, dict]:
    """UniRef50/UniRef90 clusters, records and residues per split of ``table`` (rep50, split),
    from :func:`cluster_sizes`."""
    per = table.select("rep50", "split").join(sizes, on="rep50").group_by("split").agg(
        pl.len().alias("uniref50_clusters"),
        pl.col("uniref90_clusters").sum(),
        pl.col("sequences").sum(),
        pl.col("residues").sum(),
    )
    return {row.pop("split"): row for row in per.iter_rows(named=True)}


def sequence_splits(out: BuildDir, table: pl.DataFrame | None = None) -> pl.DataFrame:
    """(row, accession, rep50, group, split) for every row of sequences.parquet (a distinct
    sequence under its representative accession); ``table``: splits.parquet's by default."""
    seqs = pl.read_parquet(out.sequences, columns=["accession"]).with_row_index("row")
    clusters = pl.read_parquet(out.clusters, columns=["accession", "rep50"])
    splits = pl.read_parquet(out.splits) if table is None else table
    return (
        seqs.join(clusters, on="accession", how="left")
        .join(splits.select("rep50", "group", "split"), on="rep50", how="left")
        .select(pl.col("row").cast(pl.Int64), "accession", "rep50", "group", "split")
    )


def final_splits(out: BuildDir, decontaminated: bool) -> pl.DataFrame:
    """(rep50, split) as the shards see it: splits.parquet, with the clusters the
    decontaminate stage moved out of train as ``excluded`` (``decontaminated``: the build has
    ``decontaminate:`` sets)."""
    out.require(out.splits)
    table = pl.read_parquet(out.splits, columns=["rep50", "split"])
    if not decontaminated:
        return table
    out.require(out.decontamination)
    moved = pl.read_parquet(out.decontamination, columns=["rep50"]).get_column("rep50")
    return table.with_columns(
        pl.when(pl.col("rep50").is_in(moved.implode())).then(pl.lit(EXCLUDED))
        .otherwise(pl.col("split")).alias("split")
    )


def run(cfg: BuildConfig) -> dict:
    """The split stage of a build."""
    return split(cfg.out_dir, cfg.split, cfg.seed, cfg.threads, cfg.cluster.mmseqs)
