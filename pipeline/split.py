"""Train/valid/test assignment of whole UniRef50 clusters (no cluster in two splits)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from pipeline.atomic import atomic_path, write_text_atomic
from pipeline.build_dir import SPLITS, BuildDir
from pipeline.config import BuildConfig, SplitConfig
from pipeline.errors import PipelineError
from pipeline.ids import uniform
from pipeline.linking import link_clusters


def split_of(cluster_id: str, seed: int, valid: float, test: float) -> str:
    """The split of one cluster: a uniform draw from a seeded hash of its id."""
    u = uniform(seed, cluster_id)
    if u < valid:
        return "valid"
    if u < valid + test:
        return "test"
    return "train"


def read_pins(path: str | Path) -> pl.DataFrame:
    """A (rep50, split) table from a previous build's splits.parquet or a two-column TSV."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: split pins file not found")
    if p.suffix == ".parquet":
        df = pl.read_parquet(p)
    else:
        df = pl.read_csv(p, separator="\t", has_header=False, new_columns=["rep50", "split"],
                         comment_prefix="#")
        if df.height and df.row(0) == ("rep50", "split"):
            df = df.slice(1)
    if df.columns[:2] != ["rep50", "split"]:
        raise PipelineError(f"{p}: expected columns rep50, split; found {df.columns}")
    bad = df.filter(~pl.col("split").is_in(SPLITS))
    if bad.height:
        raise PipelineError(f"{p}: cluster {bad.row(0)[0]}: unknown split {bad.row(0)[1]!r}")
    dup = df.filter(pl.col("rep50").is_duplicated())
    if dup.height:
        raise PipelineError(f"{p}: cluster {dup.row(0)[0]} is pinned more than once")
    return df.select("rep50", "split")


def assign_splits(
    groups: pl.DataFrame, cfg: SplitConfig, seed: int
) -> tuple[pl.DataFrame, dict[str, int]]:
    """(rep50, group, split, pinned) for every UniRef50 cluster, and pin statistics.

    The split is drawn per split group (a single cluster unless linking joined several). A pin
    moves its cluster's whole group; a group whose pins disagree goes to train, so that no
    held-out sequence has a linked homolog in train.
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
    if not cfg.pins:
        return table.with_columns(pl.lit(False).alias("pinned")), info
    pins = read_pins(cfg.pins)
    info["pins_not_in_build"] = pins.join(table, on="rep50", how="anti").height
    pinned = pins.join(table.select("rep50", "group"), on="rep50")
    info["pinned_clusters"] = pinned.height
    per_group = pinned.group_by("group").agg(pl.col("split").unique().alias("pins"))
    per_group = per_group.with_columns(
        pl.when(pl.col("pins").list.len() == 1)
        .then(pl.col("pins").list.first())
        .otherwise(pl.lit("train"))
        .alias("group_split")
    )
    info["conflicting_pin_groups"] = per_group.filter(pl.col("pins").list.len() > 1).height
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
    table, info = assign_splits(groups, cfg, seed)
    with atomic_path(out.splits) as tmp:
        table.write_parquet(tmp, compression="zstd")
    lengths = (
        pl.read_parquet(out.records, columns=["accession", "seq_hash"])
        .join(pl.read_parquet(out.sequences, columns=["seq_hash", "length"]),
              on="seq_hash")
        .select("accession", "length")
    )
    per = (
        clusters.join(table.select("rep50", "split"), on="rep50")
        .join(lengths, on="accession")
        .group_by("split")
        .agg(
            pl.col("rep50").n_unique().alias("uniref50_clusters"),
            pl.col("rep90").n_unique().alias("uniref90_clusters"),
            pl.len().alias("sequences"),
            pl.col("length").sum().alias("residues"),
        )
    )
    counts = {row.pop("split"): row for row in per.iter_rows(named=True)}
    stats = {
        "seed": seed,
        "fractions": {"valid": cfg.valid_fraction, "test": cfg.test_fraction},
        "pins": cfg.pins,
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
            name: counts.get(name, dict.fromkeys(
                ("uniref50_clusters", "uniref90_clusters", "sequences", "residues"), 0))
            for name in SPLITS
        },
    }
    write_text_atomic(out.stats("split"), json.dumps(stats, indent=2) + "\n")
    return stats


def run(cfg: BuildConfig) -> dict:
    """The split stage of a build."""
    return split(cfg.out_dir, cfg.split, cfg.seed, cfg.threads, cfg.cluster.mmseqs)
