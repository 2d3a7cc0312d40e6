"""Rebuild the embedded sample (data/sample/uniprot_sample.fasta.gz) from ../shared/data.

The sample is real UniProtKB data: every record of the OpenFold jackhmmer UniProt hits (real
homologous families, current-style headers with OX=) plus the first N entries of the MMseqs2
example database (2016-style headers, unrelated full-length proteins, exact duplicates).
Usage: python scripts/make_sample.py [--shared ../shared/data] [--db-records 1500]
"""

from __future__ import annotations

import argparse
import gzip as gzip_module
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_records(path: Path) -> list[tuple[str, str]]:
    """(header line, body lines) pairs of a gzip FASTA, unchanged."""
    out: list[tuple[str, str]] = []
    with gzip_module.open(path, "rt") as fh:
        for chunk in fh.read().split("\n>"):
            header, _, body = chunk.lstrip(">").partition("\n")
            out.append((header, body.rstrip("\n")))
    return out


def accession(header: str) -> str:
    return header.split()[0].split("|")[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--db-records", type=int, default=1500)
    default_out = ROOT / "data" / "sample" / "uniprot_sample.fasta.gz"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    families = read_records(args.shared / "openfold_msa_uniprot_hits.fasta.gz")
    seen = {accession(h) for h, _ in families}
    extra = []
    for header, body in read_records(args.shared / "mmseqs2_examples_db.fasta.gz"):
        if len(extra) == args.db_records:
            break
        if accession(header) not in seen:
            seen.add(accession(header))
            extra.append((header, body))
    text = "".join(f">{h}\n{b}\n" for h, b in families + extra).encode()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip_module.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as gz:
        gz.write(text)
    args.out.write_bytes(buf.getvalue())
    print(f"{args.out}: {len(families) + len(extra)} records "
          f"({len(families)} OpenFold UniProt hits + {len(extra)} MMseqs2 example entries)")


if __name__ == "__main__":
    main()
