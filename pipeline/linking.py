"""Split groups: UniRef50 clusters linked by residual homology, so splits can keep them together.

Two sources of links (``split.link_method``): ``alignments`` (default) reads the cross-cluster
pairs the UniRef50 clustering itself aligned (``cluster_links.parquet``, written by the cluster
stage: no extra search, linear in the clustering's own work); ``search`` runs the search below.

Greedy clustering leaves sequences that are >= 50% identical to a *different* cluster's
representative (a fragment or a sequence that joined a longer representative first). Assigning
splits per cluster would let such pairs straddle train and valid/test. Here the UniRef90
representatives (or every distinct sequence, ``split.link_queries: all``) are searched against the
UniRef50 representatives with MMseqs2; each hit links the query's cluster with the target's, and
the connected components (scipy.sparse.csgraph) become split groups named by their smallest
cluster id. The search's prefilter compares every query with every representative, so its cost
grows with queries x representatives; ``link_sensitivity`` and ``link_max_seqs`` set its price.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.atomic import scratch_dir
from pipeline.build_dir import BuildDir
from pipeline.config import SplitConfig
from pipeline.errors import PipelineError
from pipeline.ids import accession_of
from pipeline.mmseqs import MMseqs, write_indexed_fasta


def row_clusters(out: BuildDir) -> pl.DataFrame:
    """(row, accession, rep90, rep50) for every row of sequences.parquet, in row order."""
    seqs = pl.read_parquet(out.sequences, columns=["accession"]).with_row_index("row")
    clusters = pl.read_parquet(out.clusters, columns=["accession", "rep90", "rep50"])
    return seqs.join(clusters, on="accession", how="left").select(
        pl.col("row").cast(pl.Int64), "accession", "rep90", "rep50"
    ).sort("row")


def components(reps: pl.Series, edges: pl.DataFrame) -> pl.DataFrame:
    """(rep50, group) where group is the smallest rep50 id of its connected component."""
    index = pl.DataFrame({"rep50": reps.sort()}).with_row_index("i")
    pairs = (
        edges.join(index, left_on="a", right_on="rep50")
        .rename({"i": "ia"})
        .join(index, left_on="b", right_on="rep50")
        .rename({"i": "ib"})
    )
    n = index.height
    ia = pairs.get_column("ia").to_numpy().astype(np.int64)
    ib = pairs.get_column("ib").to_numpy().astype(np.int64)
    graph = coo_matrix((np.ones(len(ia), dtype=np.int8), (ia, ib)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # rep ids are sorted, so the first member of each component has the smallest id
    first = np.full(labels.max() + 1 if n else 0, -1)
    for i in range(n - 1, -1, -1):
        first[labels[i]] = i
    names = index.get_column("rep50").to_numpy()
    return pl.DataFrame({"rep50": names, "group": names[first[labels]]})


def _is_representative(rows: pl.DataFrame, level: int) -> np.ndarray:
    """Mask in row order: is the row the representative of its UniRef``level`` cluster?"""
    own_rep = accession_of(level, pl.col(f"rep{level}"))
    return rows.select((pl.col("accession") == own_rep).fill_null(False)).to_series().to_numpy()


def link_clusters(out: BuildDir, cfg: SplitConfig, threads: int, mmseqs: str | None) -> tuple[
    pl.DataFrame, int
]:
    """(rep50, group) for every UniRef50 cluster, and the number of cross-cluster links."""
    if cfg.link_identity is not None and cfg.link_method == "alignments":
        return _link_by_alignments(out, cfg.link_identity)
    rows = row_clusters(out)
    reps = rows.get_column("rep50").unique()
    if cfg.link_identity is None:
        return pl.DataFrame({"rep50": reps.sort(), "group": reps.sort()}), 0
    is_rep = _is_representative(rows, 50)
    is_query = _is_representative(rows, 90) if cfg.link_queries == "uniref90" else None
    mm = MMseqs.create(mmseqs, threads, out.log("split.mmseqs"))
    mm.log.write_text(f"mmseqs {mm.version}\n", encoding="utf-8")
    with scratch_dir(out, "split") as tmp:
        write_indexed_fasta(out.sequences, tmp / "queries.fasta", keep=is_query)
        write_indexed_fasta(out.sequences, tmp / "reps.fasta", keep=is_rep)
        hits = mm.search(
            tmp / "queries.fasta", tmp / "reps.fasta", tmp, ("query", "target"),
            "-s", str(cfg.link_sensitivity), "-c", str(cfg.link_coverage), "--cov-mode", "2",
            "--min-seq-id", str(cfg.link_identity), "--alignment-mode", "3", "-e", "1e-3",
            "--max-seqs", str(cfg.link_max_seqs),
        )
    row_rep50 = rows.select("row", "rep50")
    edges = (
        hits.join(row_rep50.rename({"row": "query", "rep50": "a"}), on="query")
        .join(row_rep50.rename({"row": "target", "rep50": "b"}), on="target")
        .filter(pl.col("a") != pl.col("b"))
        .select("a", "b")
        .unique()
    )
    return components(reps, edges), edges.height


def _link_by_alignments(out: BuildDir, identity: float) -> tuple[pl.DataFrame, int]:
    """Links from the clustering's own cross-cluster alignments (``cluster_links.parquet``)."""
    path = out.cluster_links
    if not path.is_file():
        raise PipelineError(f"{path}: missing (rerun 'esm2-data cluster': it keeps the "
                            "clustering's alignments for linking)")
    reps = pl.read_parquet(out.clusters, columns=["rep50"]).get_column("rep50")
    edges = pl.read_parquet(path).filter(pl.col("identity") >= identity).select("a", "b")
    return components(reps.unique(), edges), edges.height
