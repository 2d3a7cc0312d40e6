"""UniProt's own UniRef release as a cluster source: the UniRef50 XML read as a stream.

``uniref50.xml.gz`` follows UniProt's ``uniref.xsd``: one ``<entry id="UniRef50_…">`` per
cluster, a ``<representativeMember>`` and ``<member>`` elements, each holding one
``<dbReference type="UniProtKB ID" | "UniParc ID">`` whose ``<property type="UniRef90 ID">``
names the UniRef90 cluster it belongs to. :func:`read_membership` turns it into the table the
build's later stages take: (rep50, rep90, uniprot_entries), one row per UniRef90 cluster, where
``uniprot_entries`` counts the cluster's UniProtKB members (UniParc-only members are no UniProtKB
entries). Memory does not grow with the input: ``lxml.etree.iterparse`` hands over each
``dbReference`` as it ends, every finished element is cleared and dropped from its parent (an
entry of 10^5 members never exists as a tree), and rows leave for a Parquet file in chunks.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from lxml import etree

from pipeline.atomic import atomic_path, scratch_dir, write_text_atomic
from pipeline.build_dir import BuildDir
from pipeline.errors import InputFormatError
from pipeline.fasta import GZIP_MAGIC
from pipeline.ids import ENTRIES, uniref_id
from pipeline.partition import (
    BucketWriter,
    bucket_of,
    fanout,
    group_rows,
    hashed_keys,
    iter_split,
)
from pipeline.stats import size_stats

NS = "{http://uniprot.org/uniref}"
SCHEMA = pa.schema([("rep50", pa.string()), ("rep90", pa.string()),
                    ("uniprot_entries", pa.int64())])
_CHUNK_ROWS = 100_000  # membership rows buffered before a write


@dataclass(frozen=True)
class Entry:
    """One UniRef50 cluster: its UniRef90 clusters and their UniProtKB member counts."""

    id: str
    line: int
    uniref90: dict[str, int]  # UniRef90 id -> UniProtKB members (0: UniParc members only)


def _open(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if gz else open(path, "rb")


def iter_entries(path: str | Path) -> Iterator[Entry]:
    """The entries of a UniRef50 XML file (plain or gzip), in file order, one at a time.

    A member without a UniRef90 id, an entry without members and a truncated or malformed file
    are :class:`InputFormatError` lines naming the file and the entry.
    """
    path = Path(path)
    current: str | None = None  # the entry being read (for messages)
    done: str | None = None  # the last entry read whole
    line = 0
    counts: Counter[str] = Counter()
    members = 0
    member_tags = (f"{NS}member", f"{NS}representativeMember")
    try:
        with _open(path) as stream:
            events = etree.iterparse(stream, events=("end",), tag=(f"{NS}entry", *member_tags),
                                     huge_tree=True, resolve_entities=False, no_network=True)
            for _, elem in events:
                if elem.tag != f"{NS}entry":  # a finished member: count it, then free it
                    if current is None:
                        entry = elem.getparent()
                        current, line = entry.get("id") or "?", entry.sourceline or 0
                    ref = _reference(elem)  # once per member: the hot path
                    counts[_uniref90(path, elem, ref, current, line)] += _is_uniprot(ref)
                    members += 1
                    _drop(elem)
                    continue
                current, line = elem.get("id") or "?", elem.sourceline or 0
                if not members:
                    raise InputFormatError(f"{path}: entry {current} (line {line}): no members")
                yield Entry(current, line, dict(counts))
                _drop(elem)
                done, current, counts, members = current, None, Counter(), 0
    except etree.XMLSyntaxError as err:
        where = (f"in entry {current} (line {line})" if current else
                 f"after entry {done}" if done else "before the first entry")
        raise InputFormatError(f"{path}: truncated or malformed XML {where}: "
                               f"{err.msg.splitlines()[0] if err.msg else err}") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise InputFormatError(f"{path}: truncated or corrupt gzip after entry {current} "
                               f"(line {line}): {err}") from None


def _reference(member: etree._Element) -> etree._Element | None:
    for child in member:
        if child.tag == f"{NS}dbReference":
            return child
    return None


def _is_uniprot(ref: etree._Element | None) -> int:
    """1 when a member's dbReference is a UniProtKB entry."""
    return int(ref is not None and ref.get("type") == "UniProtKB ID")


def _uniref90(path: Path, member: etree._Element, ref: etree._Element | None, entry: str,
              line: int) -> str:
    """The UniRef90 id a member's dbReference (``ref``) carries (a one-line error when it has
    none)."""
    if ref is not None:
        for prop in ref:
            if prop.get("type") == "UniRef90 ID":
                return prop.get("value")
    ident = ref.get("id") if ref is not None else "?"
    raise InputFormatError(f"{path}: entry {entry} (line {line}): member {ident} "
                           f"(line {member.sourceline}) has no UniRef90 ID")


def _drop(elem: etree._Element) -> None:
    """Free a finished element and every earlier sibling (iterparse keeps them otherwise)."""
    elem.clear(keep_tail=False)
    parent = elem.getparent()
    if parent is not None:
        while elem.getprevious() is not None:
            del parent[0]


def read_membership(path: str | Path, dest: str | Path, chunk_rows: int = _CHUNK_ROWS,
                    bucket_bytes: int = 32 << 20) -> dict:
    """Write (rep50, rep90, uniprot_entries) for every UniRef90 cluster of the UniRef50 XML at
    ``path`` to the Parquet file ``dest`` (atomically); returns counts. A UniRef90 cluster in two
    UniRef50 entries is an error naming both: the rows are also partitioned on disk by UniRef90
    id (one partition per ``bucket_bytes`` of XML file; at most ``partition.MAX_FANOUT`` written
    at once, split on disk to the planned size before the check), and each partition is checked
    alone, so memory, open files and append sizes stay bounded at any release size."""
    rows: dict[str, list] = {"rep50": [], "rep90": [], "uniprot_entries": []}
    entries = clusters = members = 0
    planned = max(1, math.ceil(Path(path).stat().st_size / bucket_bytes))
    with (atomic_path(dest) as tmp, scratch_dir(Path(dest).parent, "uniref") as scratch,
          BucketWriter(scratch, "rep90", fanout(planned)) as buckets):
        writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
        try:
            for entry in iter_entries(path):
                entries += 1
                for rep90, count in sorted(entry.uniref90.items()):
                    rows["rep50"].append(entry.id)
                    rows["rep90"].append(rep90)
                    rows["uniprot_entries"].append(count)
                    members += count
                clusters += len(entry.uniref90)
                if len(rows["rep90"]) >= chunk_rows:
                    _flush(rows, writer, buckets)
                    rows = {k: [] for k in rows}
            _flush(rows, writer, buckets)
        finally:
            writer.close()
        for part in iter_split(buckets.close(), planned, _rep90_keys, scratch):
            _check_unique(path, pl.from_arrow(part))
    return {"uniref50_entries": entries, "uniref90_clusters": clusters,
            "uniprot_members": members}


def _flush(rows: dict[str, list], writer: pq.ParquetWriter, buckets: BucketWriter) -> None:
    table = pa.table(rows, schema=SCHEMA)
    writer.write_table(table)
    ids = table.select(["rep90", "rep50"])
    buckets.write_grouped(*group_rows(ids, bucket_of(_rep90_keys(ids), buckets.n), buckets.n))


def _rep90_keys(table: pa.Table) -> np.ndarray:
    """A 48-bit partition key per row: the top bits of its UniRef90 id's hash."""
    return hashed_keys(table.column("rep90"))


def _check_unique(path: str | Path, part: pl.DataFrame) -> None:
    """One partition's UniRef90 ids each belong to one UniRef50 entry."""
    twice = (part.group_by("rep90").agg(pl.col("rep50").sort(), pl.len())
             .filter(pl.col("len") > 1).sort("rep90"))
    if twice.height:
        rep90, rep50 = twice.row(0)[:2]
        raise InputFormatError(f"{path}: {rep90} is a member of {rep50[0]} and of {rep50[1]}")


def cluster_from_uniref(out_dir: str | Path, xml: Path, on_error: str = "fail") -> dict:
    """The cluster stage of ``cluster.source: uniref``: UniProt's UniRef50 membership of the
    ingested UniRef90 representatives (``uniref90.fasta.gz``) as ``clusters.parquet`` (with
    ``uniprot_entries`` per UniRef90 cluster, so the shards' entry counts stay UniProt's), and
    an empty ``cluster_links.parquet`` (UniRef50 already is the 50% rule).

    A UniRef90 cluster of the XML with no FASTA record, and a FASTA record in no UniRef50
    entry, are one-line errors (``ingest.on_error: skip``: counted in ``stats/cluster.json`` and
    left out)."""
    out = BuildDir(out_dir)
    out.require(out.sequences, out.records, xml)
    with scratch_dir(out, "cluster") as tmp:
        info = read_membership(xml, tmp / "membership.parquet")
        membership = pl.read_parquet(tmp / "membership.parquet")
    records = pl.read_parquet(out.records, columns=["accession", "rep_accession"])
    joined = (
        records.with_columns(uniref_id(90, pl.col("accession")).alias("rep90"))
        .join(membership, on="rep90", how="full", coalesce=True)
    )
    problems = {
        "uniref90_without_record": joined.filter(pl.col("accession").is_null()),
        "records_in_no_uniref50": joined.filter(pl.col("rep50").is_null()),
    }
    skipped = {}
    for kind, rows in problems.items():
        if rows.is_empty():
            continue
        first = rows.sort("rep90").row(0, named=True)
        message = (f"{xml}: entry {first['rep50']}: {first['rep90']} has no record in the "
                   "UniRef90 FASTA" if kind == "uniref90_without_record" else
                   f"{out.records}: record {first['accession']} ({first['rep90']}) is in no "
                   f"UniRef50 entry of {xml}")
        if on_error == "fail":
            raise InputFormatError(f"{message} ({rows.height} such)")
        skipped[kind] = rows.height
    collapsed = joined.filter(pl.col("accession").is_not_null() & pl.col("rep50").is_not_null()
                              & (pl.col("accession") != pl.col("rep_accession")))
    if collapsed.height:
        row = collapsed.row(0, named=True)
        raise InputFormatError(f"{out.records}: {row['rep90']} has the sequence of "
                               f"UniRef90_{row['rep_accession']}: two UniRef90 clusters with one "
                               "sequence (the UniRef90 FASTA and XML disagree)")
    table = (
        joined.filter(pl.col("accession").is_not_null() & pl.col("rep50").is_not_null())
        .select("accession", "rep90", "rep50", pl.col(ENTRIES).cast(pl.Int64))
        .sort("rep50", "rep90", "accession")
    )
    if table.is_empty():
        raise InputFormatError(f"{xml}: no UniRef90 cluster of the XML has a FASTA record")
    with atomic_path(out.clusters) as tmp_out:
        table.write_parquet(tmp_out, compression="zstd", row_group_size=1_000_000)
    links = pl.DataFrame(schema={"a": pl.String, "b": pl.String, "identity": pl.Float64})
    with atomic_path(out.cluster_links) as tmp_out:
        links.write_parquet(tmp_out, compression="zstd")
    per50 = table.group_by("rep50").agg(pl.len().alias("uniref90"),
                                        pl.col(ENTRIES).sum().alias("entries"))
    # the MMseqs2 source's keys, sizes in UniProtKB entries (UniParc-only clusters count 1)
    stats = {
        "source": "uniref",
        "xml": {"file": xml.name, **info},
        "sequences": table.height,
        "records": table.height,
        "uniref90": size_stats(table.get_column(ENTRIES).clip(1)),
        "uniref50": size_stats(per50.get_column("entries").clip(1)),
        "uniref90_per_uniref50": size_stats(per50.get_column("uniref90")),
        "skipped": skipped,
        "alignment_links": 0,
    }
    write_text_atomic(out.stats("cluster"), json.dumps(stats, indent=2) + "\n")
    return stats
