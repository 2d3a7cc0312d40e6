"""Identifiers: UniRef cluster ids, and the hashes that order, assign and key them.

Every hash of the build is blake2b with an 8-byte digest: ``seeded_digest(seed, text)`` for
choices that a seed changes (split assignment, shard and validation order, leakage sampling),
``cluster_hash(id)`` for a cluster's fixed 64-bit key (``keys.npy``, the trainer's per-cluster
random streams).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

UNIREF50 = "UniRef50_"
UNIREF90 = "UniRef90_"
UNIREF100 = "UniRef100_"
_PREFIX = {50: UNIREF50, 90: UNIREF90}


#: clusters.parquet's column under cluster.source uniref: the UniProtKB entries a row (one
#: UniRef90 cluster) stands for; under the MMseqs2 source every row is one entry
ENTRIES = "uniprot_entries"


def entries_sum(columns: list[str]) -> pl.Expr:
    """The UniProtKB entries of a group of clusters.parquet rows (an aggregation)."""
    import polars as pl

    return pl.col(ENTRIES).sum().cast(pl.Int64) if ENTRIES in columns else pl.len().cast(
        pl.Int64)


def uniref_id(level: int, accession: pl.Expr) -> pl.Expr:
    """``UniRef<level>_<accession>``: the id of the cluster an accession represents."""
    return _PREFIX[level] + accession


def accession_of(level: int, cluster_id: pl.Expr) -> pl.Expr:
    """The representative's accession in a ``UniRef<level>_`` cluster id."""
    return cluster_id.str.strip_prefix(_PREFIX[level])


def seeded_digest(seed: int, text: str) -> bytes:
    """The 8-byte seeded hash of ``text``."""
    return hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()


def order_key(seed: int, text: str) -> str:
    """The seeded hash as 16 hex characters: sorting by it is a seeded shuffle."""
    return seeded_digest(seed, text).hex()


def uniform(seed: int, text: str) -> float:
    """A uniform draw in [0, 1) from the seeded hash of ``text``."""
    return int.from_bytes(seeded_digest(seed, text), "big") / 2**64


def cluster_hash(cluster_id: str) -> int:
    """The 64-bit hash of a cluster id (``keys.npy``; seeds a cluster's random choices)."""
    return int.from_bytes(hashlib.blake2b(cluster_id.encode(), digest_size=8).digest(), "little")
