"""Leakage check: how close do held-out (valid/test) sequences come to the training set?

MMseqs2 searches a seeded sample of the valid and test sequences against every train sequence
(coverage of the query >= ``coverage``, full alignments for exact identity). The report gives the
distribution of each query's best-hit identity and the fraction at or above
``identity_threshold``; the build fails when that fraction exceeds ``max_fraction``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.atomic import scratch_dir, write_text_atomic
from pipeline.build_dir import BuildDir
from pipeline.config import BuildConfig, LeakageConfig
from pipeline.errors import PipelineError
from pipeline.ids import order_key
from pipeline.mmseqs import MMseqs, write_indexed_fasta
from pipeline.split import sequence_splits
from pipeline.stats import identity_histogram

HELD_OUT = ("valid", "test")  # the splits checked against train (not the excluded clusters)

def _sample(rows: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    if rows.height <= n:
        return rows
    key = rows.get_column("accession").map_elements(
        lambda a: order_key(seed, a),
        return_dtype=pl.String,
    )
    return rows.with_columns(key.alias("_k")).sort("_k").head(n).drop("_k").sort("row")


def check_leakage(out_dir: str | Path, cfg: LeakageConfig, seed: int, threads: int,
                  mmseqs: str | None = None) -> dict:
    """Search held-out sequences against train; write stats/leakage.json or fail."""
    out = BuildDir(out_dir)
    out.require(out.sequences, out.clusters, out.splits)
    rows = sequence_splits(out).select("row", "accession", "split")
    if rows.get_column("split").null_count():
        raise PipelineError(f"{out}: sequences without a split (stale splits.parquet?)")
    held_out = rows.filter(pl.col("split").is_in(HELD_OUT))
    queries = _sample(held_out, cfg.max_queries, seed)
    n = rows.height
    is_query = np.zeros(n, dtype=bool)
    is_query[queries.get_column("row").to_numpy()] = True
    is_train = (rows.get_column("split") == "train").to_numpy()
    if not is_train.any():
        raise PipelineError(f"{out}: no train sequences to check against")
    mm = MMseqs.create(mmseqs, threads, out.log("leakage.mmseqs"))
    mm.log.write_text(f"mmseqs {mm.version}\n", encoding="utf-8")
    best = pl.DataFrame(schema={"query": pl.Int64, "target": pl.Int64, "fident": pl.Float64})
    if is_query.any():
        with scratch_dir(out, "leakage") as tmp:
            write_indexed_fasta(out.sequences, tmp / "q.fasta", keep=is_query)
            write_indexed_fasta(out.sequences, tmp / "t.fasta", keep=is_train)
            hits = mm.search(
                tmp / "q.fasta", tmp / "t.fasta", tmp, ("query", "target", "fident"),
                "-s", str(cfg.sensitivity), "-c", str(cfg.coverage), "--cov-mode", "2",
                "--alignment-mode", "3", "-e", "1e-3",
            )
        best = hits.sort(["query", "fident", "target"], descending=[False, True, False]).unique(
            "query", keep="first", maintain_order=True
        )
    report = _report(queries, best, rows, cfg, held_out.height)
    if report["fraction_at_or_above_threshold"] > cfg.max_fraction:
        write_text_atomic(out.stats("leakage.failed"), json.dumps(report, indent=2))
        raise PipelineError(
            f"leakage check failed: {report['fraction_at_or_above_threshold']:.2%} of held-out "
            f"sequences have a train hit with >= {cfg.identity_threshold:.0%} identity at "
            f">= {cfg.coverage:.0%} coverage (limit {cfg.max_fraction:.2%}); "
            f"report: {out.stats('leakage.failed')}"
        )
    write_text_atomic(out.stats("leakage"), json.dumps(report, indent=2) + "\n")
    return report


def _report(queries: pl.DataFrame, best: pl.DataFrame, rows: pl.DataFrame,
            cfg: LeakageConfig, held_out: int) -> dict:
    ident = queries.select("row").join(best, left_on="row", right_on="query", how="left")
    values = ident.get_column("fident").drop_nulls().to_numpy()
    n = queries.height
    above = int((values >= cfg.identity_threshold).sum())
    names = rows.select("row", "accession")
    worst = (
        best.sort(["fident", "query"], descending=[True, False]).head(10)
        .join(names, left_on="query", right_on="row").rename({"accession": "held_out"})
        .join(names, left_on="target", right_on="row").rename({"accession": "train"})
        .sort(["fident", "held_out"], descending=[True, False])
        .select("held_out", "train", "fident")
    )
    return {
        "held_out_sequences": held_out,
        "queries": n,
        "queries_with_hit": len(values),
        "coverage": cfg.coverage,
        "identity_threshold": cfg.identity_threshold,
        "max_fraction": cfg.max_fraction,
        "at_or_above_threshold": above,
        "fraction_at_or_above_threshold": above / n if n else 0.0,
        "best_hit_identity_histogram": identity_histogram(values, n),
        "closest_pairs": worst.to_dicts(),
    }


def run(cfg: BuildConfig) -> dict:
    """The check-leakage stage of a build."""
    return check_leakage(cfg.out_dir, cfg.leakage, cfg.seed, cfg.threads, cfg.cluster.mmseqs)
