"""UniRef90/UniRef50-like clustering of the ingested sequences with MMseqs2.

Stage 1 clusters every distinct sequence at 90% identity with 80% coverage of the member by its
representative (the longest sequence); stage 2 clusters the UniRef90 representatives at 50% / 80%.
MMseqs2 sees sequences under their row number in ``sequences.parquet`` (no header parsing
surprises); results are joined back to accessions, and every record collapsed as an exact
duplicate at ingest inherits its representative's clusters. Output ``clusters.parquet``:
accession, rep90 (``UniRef90_<acc>``), rep50 (``UniRef50_<acc>``), sorted by rep50, rep90,
accession; cluster-size statistics in ``stats/cluster.json``. The UniRef50 clustering's own
alignments (every cascade step) that join two different clusters are kept as
``cluster_links.parquet`` (a, b, identity): split linking for free, no extra search.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.atomic import atomic_path, scratch_dir, write_text_atomic
from pipeline.build_dir import BuildDir
from pipeline.config import BuildConfig, ClusterConfig, ClusterStage
from pipeline.errors import PipelineError
from pipeline.ids import uniref_id
from pipeline.mmseqs import MMseqs, write_indexed_fasta
from pipeline.progress import progress_bar
from pipeline.stats import size_stats

log = logging.getLogger(__name__)


def run_clustering(mm: MMseqs, fasta: Path, work: Path, stage: ClusterStage,
                   keep_alignments: bool = False) -> pl.DataFrame:
    """Cluster a FASTA of ``>row`` records; returns (member, rep) row numbers.

    ``keep_alignments``: keep MMseqs2's intermediate alignment databases (every cascade step's
    ``aln_step*``, and linclust's ``aln``) under ``work/tmp`` for :func:`alignment_pairs`.
    """
    work.mkdir(parents=True, exist_ok=True)
    db, clu, tsv = work / "db", work / "clu", work / "clusters.tsv"
    mm.run("createdb", fasta, db, "--dbtype", "1", "--shuffle", "0", threads=False)
    args: list[str] = [
        "--min-seq-id", str(stage.min_seq_id), "-c", str(stage.coverage),
        "--cov-mode", str(stage.cov_mode), "--cluster-mode", str(stage.cluster_mode),
    ]
    if stage.method == "cluster" and stage.sensitivity is not None:
        args += ["-s", str(stage.sensitivity)]
    if keep_alignments:
        args += ["--remove-tmp-files", "0"]
    mm.run(stage.method, db, clu, work / "tmp", *args, *stage.extra_args)
    mm.run("createtsv", db, db, clu, tsv)
    return pl.read_csv(
        tsv, separator="\t", has_header=False, new_columns=["rep", "member"],
        schema_overrides={"rep": pl.Int64, "member": pl.Int64},
    ).select("member", "rep")


def alignment_pairs(mm: MMseqs, work: Path) -> pl.LazyFrame:
    """(query, target, identity) row pairs of every alignment the clustering in ``work`` made
    (all cascade steps, kept by ``run_clustering(keep_alignments=True)``); self pairs dropped.
    Every kept alignment already passed the stage's identity and coverage thresholds."""
    frames = []
    for dbtype in sorted((work / "tmp").rglob("aln*.dbtype")):
        aln = dbtype.with_suffix("")
        tsv = aln.with_name(aln.name + ".pairs.tsv")
        mm.run("createtsv", work / "db", work / "db", aln, tsv)
        if tsv.stat().st_size == 0:
            continue
        # columns: query, target, bits, identity, evalue, qstart, qend, qlen, tstart, tend, tlen
        frames.append(
            pl.scan_csv(tsv, separator="\t", has_header=False,
                        new_columns=["query", "target", "bits", "identity"],
                        extra_columns="ignore",
                        schema_overrides={"query": pl.Int64, "target": pl.Int64,
                                          "identity": pl.Float64})
            .select("query", "target", "identity")
            .filter(pl.col("query") != pl.col("target"))
        )
    empty = pl.LazyFrame(schema={"query": pl.Int64, "target": pl.Int64, "identity": pl.Float64})
    return pl.concat(frames) if frames else empty


def cross_cluster_links(pairs: pl.LazyFrame, c50: pl.DataFrame,
                        names: pl.DataFrame) -> pl.DataFrame:
    """UniRef50 cluster pairs (a < b) joined by an alignment, with the best identity."""
    rep_of = c50.rename({"member": "row", "rep": "rep_row"}).lazy()
    acc = names.rename({"row": "rep_row"}).lazy()
    return (
        pairs.join(rep_of.rename({"row": "query", "rep_row": "qrep"}), on="query")
        .join(rep_of.rename({"row": "target", "rep_row": "trep"}), on="target")
        .filter(pl.col("qrep") != pl.col("trep"))
        .join(acc.rename({"rep_row": "qrep", "acc": "qacc"}), on="qrep")
        .join(acc.rename({"rep_row": "trep", "acc": "tacc"}), on="trep")
        .select(
            uniref_id(50, pl.min_horizontal("qacc", "tacc")).alias("a"),
            uniref_id(50, pl.max_horizontal("qacc", "tacc")).alias("b"),
            "identity",
        )
        .group_by("a", "b").agg(pl.col("identity").max())
        .sort("a", "b")
        .collect(engine="streaming")
    )


def cluster(out_dir: str | Path, cfg: ClusterConfig, threads: int) -> dict:
    """Cluster ``out_dir/sequences.parquet``; writes clusters.parquet and stats/cluster.json."""
    out = BuildDir(out_dir)
    sequences, records = out.sequences, out.records
    out.require(sequences, records)
    mm = MMseqs.create(cfg.mmseqs, threads, out.log("cluster.mmseqs"))
    mm.log.write_text(f"mmseqs {mm.version}\n", encoding="utf-8")
    accessions = pl.read_parquet(sequences, columns=["accession"]).get_column("accession")
    n = len(accessions)
    with scratch_dir(out, "cluster") as tmp, progress_bar(total=2, desc="cluster") as bar:
        write_indexed_fasta(sequences, tmp / "all.fasta")
        c90 = run_clustering(mm, tmp / "all.fasta", tmp / "uniref90", cfg.uniref90)
        _check_complete(c90, n, "UniRef90")
        bar.update(1)
        is_rep90 = np.zeros(n, dtype=bool)
        is_rep90[c90.get_column("rep").unique().to_numpy()] = True
        write_indexed_fasta(sequences, tmp / "rep90.fasta", keep=is_rep90)
        c50 = run_clustering(mm, tmp / "rep90.fasta", tmp / "uniref50", cfg.uniref50,
                             keep_alignments=True)
        _check_complete(c50, int(is_rep90.sum()), "UniRef50")
        names = pl.DataFrame({"row": np.arange(n), "acc": accessions})
        started = time.perf_counter()
        links = cross_cluster_links(alignment_pairs(mm, tmp / "uniref50"), c50, names)
        log.info("alignment links: %d cluster pairs in %.2f s", links.height,
                 time.perf_counter() - started)
        bar.update(1)
    rows = (
        c90.rename({"member": "row", "rep": "rep90_row"})
        .join(c50.rename({"member": "rep90_row", "rep": "rep50_row"}), on="rep90_row")
        .join(names, on="row")
        .join(names.rename({"row": "rep90_row", "acc": "rep90_acc"}), on="rep90_row")
        .join(names.rename({"row": "rep50_row", "acc": "rep50_acc"}), on="rep50_row")
        .select(
            pl.col("acc").alias("rep_accession"),
            uniref_id(90, pl.col("rep90_acc")).alias("rep90"),
            uniref_id(50, pl.col("rep50_acc")).alias("rep50"),
        )
    )
    table = (
        pl.read_parquet(records, columns=["accession", "rep_accession"])
        .join(rows, on="rep_accession", how="left")
        .select("accession", "rep90", "rep50")
        .sort(["rep50", "rep90", "accession"])
    )
    if table.get_column("rep90").null_count():
        raise PipelineError(f"{records}: records whose sequence was not clustered (stale input?)")
    with atomic_path(out.clusters) as tmp_out:
        table.write_parquet(tmp_out, compression="zstd", row_group_size=1_000_000)
    with atomic_path(out.cluster_links) as tmp_out:
        links.write_parquet(tmp_out, compression="zstd", row_group_size=1_000_000)
    stats = {
        "mmseqs_version": mm.version,
        "sequences": n,
        "records": table.height,
        "uniref90": size_stats(table.group_by("rep90").len().get_column("len")),
        "uniref50": size_stats(table.group_by("rep50").len().get_column("len")),
        "uniref90_per_uniref50": size_stats(
            table.select("rep50", "rep90").unique().group_by("rep50").len().get_column("len")
        ),
        "alignment_links": links.height,
        # where MMseqs2 runs is not what it computes; the source is this function (mmseqs)
        "params": cfg.model_dump(mode="json", exclude={"runner", "source"}),
    }
    write_text_atomic(out.stats("cluster"), json.dumps(stats, indent=2) + "\n")
    return stats


def _check_complete(pairs: pl.DataFrame, expected: int, label: str) -> None:
    if pairs.height != expected or pairs.get_column("member").n_unique() != expected:
        raise PipelineError(
            f"{label} clustering returned {pairs.height} assignments for {expected} sequences"
        )


def run(cfg: BuildConfig) -> dict:
    """The cluster stage of a build: MMseqs2, or UniProt's own UniRef50 clusters."""
    if cfg.cluster.source == "uniref":
        from pipeline.uniref import cluster_from_uniref

        return cluster_from_uniref(cfg.out_dir, cfg.uniref_xml, cfg.ingest.on_error)
    return cluster(cfg.out_dir, cfg.cluster, cfg.threads)
