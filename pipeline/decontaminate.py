"""Decontamination: keep evaluation sets (ProteinGym, CAMEO, FLIP, an assay) out of train.

Each ``decontaminate:`` set is fetched and checksummed like an input (into
``raw/evaluation_sets/``), checked as ingest checks FASTA, and searched with MMseqs2 against
every train sequence (all of them, not only representatives; coverage of the evaluation
sequence). Every train split group with a hit at >= the set's identity leaves train as a whole
group, so no near-copy stays behind through a linked cluster. The moved clusters, with the hit
that moved them, are ``decontamination.parquet`` (rep50, group, set, query, target, identity);
``stats/decontamination.json`` is the report (per set: sequences with a hit, what was excluded,
the best-hit identity histogram, the closest pairs). The shards stage reads the split table
through :func:`pipeline.split.final_splits`: the moved clusters are in no shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.atomic import atomic_path, scratch_dir, write_text_atomic
from pipeline.build_dir import EXCLUDED
from pipeline.config import BuildConfig, EvaluationSet
from pipeline.download import RetryPolicy, fetch
from pipeline.errors import PipelineError
from pipeline.mmseqs import MMseqs, write_fasta, write_indexed_fasta
from pipeline.records import read_sequences
from pipeline.split import cluster_sizes, sequence_splits, split_counts, zero_counts
from pipeline.stats import identity_histogram

CLOSEST_PAIRS = 10
_EVIDENCE = {"rep50": pl.String, "group": pl.String, "set": pl.String, "query": pl.String,
             "target": pl.String, "identity": pl.Float64}


def read_set(item: EvaluationSet, raw: Path, policy: RetryPolicy) -> tuple[dict, list[str],
                                                                            list[str]]:
    """Fetch and check one evaluation set: its fetch record, record IDs and sequences."""
    name = f"decontaminate set {item.name!r}"
    dest = raw / item.file_name
    if not (item.md5 or item.sha256):  # nothing to tell a stale copy from the set: fetch again
        dest.unlink(missing_ok=True)
    try:
        fetched = fetch(item.url, dest, md5=item.md5, sha256=item.sha256, policy=policy)
    except PipelineError as err:
        raise PipelineError(f"{name}: {err}") from None
    try:  # the error names the fetched copy; say where it came from too
        records = list(read_sequences(fetched.path))
    except PipelineError as err:
        raise PipelineError(f"{name} ({item.url}): {err}") from None
    except (OSError, EOFError) as err:  # e.g. a truncated gzip
        raise PipelineError(f"{name} ({item.url}): {fetched.path}: {err}") from None
    if not records:  # e.g. only headers
        raise PipelineError(f"{name} ({item.url}): {fetched.path}: no sequences")
    record = {"url": item.url, "path": Path(fetched.path).name, "bytes": fetched.size,
              "sha256": fetched.sha256}
    return record, [r[0] for r in records], [r[1] for r in records]


def _search_set(mm: MMseqs, item: EvaluationSet, sequences: list[str], train_db: Path,
                work: Path) -> pl.DataFrame:
    """(query index, target row, identity) of every train hit of one set's sequences."""
    work.mkdir(parents=True)
    with open(work / "q.fasta", "w", encoding="ascii") as fh:
        write_fasta([(str(i), s) for i, s in enumerate(sequences)], fh)
    return mm.search_dbs(
        mm.createdb(work / "q.fasta", work / "q"), train_db, work,
        ("query", "target", "fident"),
        "-s", str(item.sensitivity), "-c", str(item.coverage), "--cov-mode", "2",
        "--alignment-mode", "3", "-e", "1e-3", "--max-seqs", str(item.max_seqs),
    )


def _set_report(item: EvaluationSet, record: dict, ids: list[str], hits: pl.DataFrame,
                rows: pl.DataFrame) -> tuple[dict, pl.DataFrame]:
    """One set's report and its evidence: the groups it moves with their closest hit."""
    best = hits.sort(["query", "fident", "target"], descending=[False, True, False]).unique(
        "query", keep="first", maintain_order=True)
    passing = hits.filter(pl.col("fident") >= item.identity)
    names = pl.DataFrame({"query": np.arange(len(ids), dtype=np.int64), "query_id": ids})
    hit_rows = (
        passing.join(names, on="query")
        .join(rows.rename({"row": "target"}), on="target")
        .sort(["group", "fident", "query", "target"], descending=[False, True, False, False])
    )
    per_group = hit_rows.unique("group", keep="first", maintain_order=True).select(
        "group", pl.lit(item.name).alias("set"), pl.col("query_id").alias("query"),
        pl.col("accession").alias("target"), pl.col("fident").alias("identity"),
    )
    closest = (
        hit_rows.sort(["fident", "query", "target"], descending=[True, False, False])
        .unique("query", keep="first", maintain_order=True).head(CLOSEST_PAIRS)
        .select(pl.col("query_id").alias("evaluation"), pl.col("accession").alias("train"),
                "rep50", pl.col("fident").alias("identity"))
    )
    report = {
        **record,
        "identity": item.identity, "coverage": item.coverage,
        "sensitivity": item.sensitivity, "max_seqs": item.max_seqs,
        "sequences": len(ids),
        "sequences_with_hit": passing.get_column("query").n_unique(),
        "best_hit_identity_histogram": identity_histogram(
            best.get_column("fident").to_numpy(), len(ids)),
        "closest_pairs": closest.to_dicts(),
    }
    return report, per_group


def decontaminate(cfg: BuildConfig) -> dict:
    """Search every ``decontaminate:`` set against train; write decontamination.parquet and
    stats/decontamination.json (nothing when a set is bad)."""
    out = cfg.out
    if not cfg.decontaminate:
        raise PipelineError(f"{cfg.out_dir}: the config has no decontaminate: sets")
    out.require(out.sequences, out.records, out.clusters, out.splits)
    policy = RetryPolicy(cfg.download.retries, cfg.download.backoff_s, cfg.download.timeout_s,
                         cfg.download.block_bytes)
    sets = [(item, *read_set(item, out.evaluation_sets, policy)) for item in cfg.decontaminate]
    table = pl.read_parquet(out.splits)
    rows = sequence_splits(out, table)
    if rows.get_column("split").null_count():
        raise PipelineError(f"{out.root}: sequences without a split (stale splits.parquet?)")
    is_train = (rows.get_column("split") == "train").to_numpy()
    mm = MMseqs.create(cfg.cluster.mmseqs, cfg.threads, out.log("decontaminate.mmseqs"))
    mm.log.write_text(f"mmseqs {mm.version}\n", encoding="utf-8")
    reports, evidence = {}, []
    with scratch_dir(out, "decontaminate") as tmp:
        train_db = None
        if is_train.any():
            write_indexed_fasta(out.sequences, tmp / "train.fasta", keep=is_train)
            train_db = mm.createdb(tmp / "train.fasta", tmp / "train")
        for i, (item, record, ids, sequences) in enumerate(sets):
            hits = (_search_set(mm, item, sequences, train_db, tmp / f"set{i}")
                    if train_db is not None else
                    pl.DataFrame(schema={"query": pl.Int64, "target": pl.Int64,
                                         "fident": pl.Float64}))
            reports[item.name], groups = _set_report(item, record, ids, hits, rows)
            evidence.append(groups)
    moved = _moved_clusters(table, evidence)
    sizes = cluster_sizes(out, pl.read_parquet(out.clusters,
                                               columns=["accession", "rep90", "rep50"]))
    train = table.filter(pl.col("split") == "train").select("rep50", "group")
    for (item, *_), groups in zip(sets, evidence, strict=True):
        # what this set alone moves (sets may overlap; "excluded" below is their union)
        reports[item.name]["excluded"] = _excluded_counts(sizes,
                                                          train.join(groups, on="group"))
    stats = {
        "sets": reports,
        "excluded": _excluded_counts(sizes, moved),
        "train_before": split_counts(sizes, table).get("train", zero_counts()),
        "train_after": split_counts(sizes, table.join(moved, on="rep50", how="anti")).get(
            "train", zero_counts()),
    }
    with atomic_path(out.decontamination) as tmp_out:
        moved.write_parquet(tmp_out, compression="zstd")
    write_text_atomic(out.stats("decontamination"), json.dumps(stats, indent=2) + "\n")
    return stats


def _moved_clusters(table: pl.DataFrame, evidence: list[pl.DataFrame]) -> pl.DataFrame:
    """Every train cluster of a hit group, with the hit of the first set (config order) that
    hit its group."""
    first = pl.concat(evidence).unique("group", keep="first", maintain_order=True)
    return (
        table.filter(pl.col("split") == "train").select("rep50", "group")
        .join(first, on="group")
        .select(list(_EVIDENCE)).cast(_EVIDENCE).sort("rep50")
    )


def _excluded_counts(sizes: pl.DataFrame, moved: pl.DataFrame) -> dict:
    """Groups, clusters, records and residues of ``moved`` (rep50, group)."""
    counts = split_counts(sizes, moved.select("rep50", pl.lit(EXCLUDED).alias("split")))
    return {"groups": moved.get_column("group").n_unique(),
            **counts.get(EXCLUDED, zero_counts())}


def run(cfg: BuildConfig) -> dict:
    """The decontaminate stage of a build."""
    return decontaminate(cfg)
