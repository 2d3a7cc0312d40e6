"""Make a small UniRef release in UniProt's real formats from real UniProtKB records.

Usage: python scripts/make_uniref_release.py OUT_DIR [FASTA ...] [--uniparc-every N]

The records (default: the real families of ../shared/data) are ingested and clustered by this
project's own stages (UniRef90 then UniRef50 rules); the clusters are then written as UniProt
publishes them: ``uniref50.xml.gz`` following ``uniref.xsd`` (one ``<entry>`` per UniRef50
cluster, its ``<representativeMember>`` with the sequence, a ``<member>`` per other record, each
``<dbReference>`` carrying its ``UniRef90 ID``) and ``uniref90.fasta.gz`` (one record per UniRef90
cluster, UniRef headers). Every N-th non-representative record (by a hash of its accession)
is written as a UniParc member (``type="UniParc ID"``, no UniProtKB entry), as real releases
have them. ``membership.parquet`` holds what a reader must find: (rep50, rep90,
uniprot_entries), one row per UniRef90 cluster. Deterministic: the same inputs give the same
bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tempfile
from pathlib import Path

import polars as pl
from lxml import etree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cluster import cluster  # noqa: E402
from pipeline.config import ClusterConfig  # noqa: E402
from pipeline.ingest import ingest  # noqa: E402

NS = "http://uniprot.org/uniref"
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_INPUTS = ["openfold_msa_uniprot_hits.fasta.gz", "mmseqs2_examples_query.fasta.gz"]


def _uniparc(accession: str, every: int) -> bool:
    return every > 0 and int(hashlib.md5(accession.encode()).hexdigest()[:8], 16) % every == 0


def _db_reference(parent: etree._Element, row: dict, uniparc: bool) -> None:
    ref = etree.SubElement(parent, f"{{{NS}}}dbReference")
    acc = row["accession"]
    if uniparc:
        ref.set("type", "UniParc ID")
        ref.set("id", f"UPI{hashlib.md5(acc.encode()).hexdigest()[:10].upper()}")
    else:
        ref.set("type", "UniProtKB ID")
        ref.set("id", row["entry_name"] or acc)
        _prop(ref, "UniProtKB accession", acc)
    _prop(ref, "UniRef100 ID", f"UniRef100_{row['rep_accession']}")
    _prop(ref, "UniRef90 ID", row["rep90"])
    _prop(ref, "length", str(row["length"]))
    if row["taxid"] is not None:
        _prop(ref, "NCBI taxonomy", str(row["taxid"]))


def _prop(parent: etree._Element, kind: str, value: str) -> None:
    etree.SubElement(parent, f"{{{NS}}}property", type=kind, value=value)


def make_release(inputs: list[Path], out: Path, uniparc_every: int = 16) -> dict:
    """Write uniref50.xml.gz, uniref90.fasta.gz and membership.parquet into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp)
        ingest(inputs, build, on_error="skip")
        cluster(build, ClusterConfig(), threads=2)
        seqs = pl.read_parquet(build / "sequences.parquet",
                               columns=["seq_hash", "sequence", "length", "description"])
        records = pl.read_parquet(build / "records.parquet")
        clusters = pl.read_parquet(build / "clusters.parquet")
    rows = (
        clusters.join(records, on="accession")
        .join(seqs, on="seq_hash")
        .with_columns(pl.col("accession").alias("entry_name"))
        .sort("rep50", "rep90", "accession")
    )
    every = uniparc_every
    rows = rows.with_columns(
        pl.struct("accession", "rep90", "rep50").map_elements(
            lambda r: (r["accession"] != r["rep50"].removeprefix("UniRef50_")
                       and _uniparc(r["accession"], every)), return_dtype=pl.Boolean)
        .alias("uniparc")
    )
    xml_bytes = io.BytesIO()
    with (gzip.GzipFile(fileobj=xml_bytes, mode="wb", mtime=0) as gz,
          etree.xmlfile(gz, encoding="ISO-8859-1") as xf):
        xf.write_declaration()
        with xf.element(f"{{{NS}}}UniRef50", nsmap={None: NS}, releaseDate="2026-11-25",
                        version="sample"):
            for (rep50,), members in rows.group_by("rep50", maintain_order=True):
                rep_acc = rep50.removeprefix("UniRef50_")
                rep = members.filter(pl.col("accession") == rep_acc).row(0, named=True)
                entry = etree.Element(f"{{{NS}}}entry", id=rep50, updated="2026-11-25",
                                      nsmap={None: NS})
                etree.SubElement(entry, f"{{{NS}}}name").text = (
                    f"Cluster: {rep['description'] or rep_acc}")
                _prop(entry, "member count", str(members.height))
                rep_el = etree.SubElement(entry, f"{{{NS}}}representativeMember")
                _db_reference(rep_el, rep, uniparc=False)
                seq_el = etree.SubElement(rep_el, f"{{{NS}}}sequence",
                                          length=str(rep["length"]))
                seq_el.text = rep["sequence"]
                for row in members.iter_rows(named=True):
                    if row["accession"] == rep_acc:
                        continue
                    member = etree.SubElement(entry, f"{{{NS}}}member")
                    _db_reference(member, row, row["uniparc"])
                xf.write(entry)
    (out / "uniref50.xml.gz").write_bytes(xml_bytes.getvalue())
    reps90 = rows.filter(pl.col("accession") == pl.col("rep90").str.strip_prefix("UniRef90_"))
    sizes = rows.group_by("rep90").len()
    fasta = io.BytesIO()
    with gzip.GzipFile(fileobj=fasta, mode="wb", mtime=0) as gz:
        for row in reps90.join(sizes, on="rep90").sort("rep90").iter_rows(named=True):
            tax = f" TaxID={row['taxid']}" if row["taxid"] is not None else ""
            gz.write(f">{row['rep90']} {row['description'] or 'protein'} n={row['len']}{tax} "
                     f"RepID={row['accession']}\n{row['sequence']}\n".encode())
    (out / "uniref90.fasta.gz").write_bytes(fasta.getvalue())
    membership = (
        rows.group_by("rep50", "rep90")
        .agg((~pl.col("uniparc")).sum().cast(pl.Int64).alias("uniprot_entries"))
        .sort("rep50", "rep90")
    )
    membership.write_parquet(out / "membership.parquet")
    return {"uniref50": membership.get_column("rep50").n_unique(),
            "uniref90": membership.height, "records": rows.height,
            "uniparc_members": int(rows.get_column("uniparc").sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("inputs", type=Path, nargs="*")
    ap.add_argument("--uniparc-every", type=int, default=16)
    args = ap.parse_args()
    inputs = args.inputs or [SHARED / name for name in DEFAULT_INPUTS]
    print(make_release(inputs, args.out, args.uniparc_every))


if __name__ == "__main__":
    main()
