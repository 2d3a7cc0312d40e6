"""UniRef50 XML reading: MB/s and peak RSS of pipeline.uniref against a bare lxml iterparse.

Usage: python benchmarks/uniref_xml.py [--sizes-mb 100 1000] [--work benchmarks/_work]

Generates gzip-compressed UniRef50 XML in UniProt's schema (entries with a Zipf-distributed
number of members, UniProtKB and UniParc members, a representative sequence each, and one entry
of 100,000 members) of about the given uncompressed size, then runs, each in its own process:

* floor: ``lxml.etree.iterparse`` over the same file, clearing each finished ``entry`` and
  dropping earlier siblings (the usual bounded-memory idiom), doing nothing else;
* ours: ``pipeline.uniref.read_membership`` (the membership table written to Parquet).

MB/s are of uncompressed XML; peak RSS is the process's maxrss.
"""

from __future__ import annotations

import argparse
import gzip
import random
import subprocess
import sys
from pathlib import Path

from _measure import run_measured

ROOT = Path(__file__).resolve().parents[1]
HEAD = ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n<UniRef50 xmlns="http://uniprot.org/uniref"'
        ' releaseDate="2024-03-27" version="2024_02">\n')
AMINO = "ACDEFGHIKLMNPQRSTVWY"

FLOOR = '''
import gzip, sys
from lxml import etree
ns = "{http://uniprot.org/uniref}"
n = 0
with gzip.open(sys.argv[1], "rb") as fh:
    for _, elem in etree.iterparse(fh, events=("end",), tag=ns + "entry", huge_tree=True):
        n += 1
        elem.clear()
        while elem.getprevious() is not None:
            del elem.getparent()[0]
print(n)
'''
OURS = '''
import sys
from pipeline.uniref import read_membership
print(read_membership(sys.argv[1], sys.argv[2]))
'''


def _member(tag: str, rng: random.Random, i: int, rep90: str) -> str:
    if rng.random() < 0.1:
        ref = f'<dbReference type="UniParc ID" id="UPI{i:010X}">'
    else:
        ref = (f'<dbReference type="UniProtKB ID" id="A{i}_HUMAN">'
               f'<property type="UniProtKB accession" value="A{i}"/>')
    seq = ""
    if tag == "representativeMember":
        length = rng.randint(50, 800)
        seq = f'<sequence length="{length}" checksum="0">' + "".join(
            rng.choices(AMINO, k=length)) + "</sequence>"
    return (f"<{tag}>{ref}<property type=\"UniRef100 ID\" value=\"UniRef100_A{i}\"/>"
            f"<property type=\"UniRef90 ID\" value=\"{rep90}\"/>"
            f"<property type=\"length\" value=\"300\"/><property type=\"NCBI taxonomy\" "
            f"value=\"9606\"/></dbReference>{seq}</{tag}>\n")


def generate(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Write ~``target_bytes`` of uncompressed XML (gzip); returns the uncompressed size."""
    rng = random.Random(seed)
    written = 0
    i = 0
    with gzip.open(path, "wt", encoding="latin-1", compresslevel=1) as fh:
        fh.write(HEAD)
        entry = 0
        while written < target_bytes:
            size = 100_000 if entry == 3 else min(int(rng.paretovariate(1.2)), 5_000)
            parts = [f'<entry id="UniRef50_E{entry}" updated="2024-01-24">'
                     f'<name>Cluster: x</name><property type="member count" value="{size}"/>\n']
            rep90 = f"UniRef90_A{i}"
            for k in range(size):
                if k and rng.random() < 0.3:
                    rep90 = f"UniRef90_A{i}"
                parts.append(_member("representativeMember" if k == 0 else "member", rng, i,
                                     rep90))
                i += 1
            parts.append("</entry>\n")
            text = "".join(parts)
            fh.write(text)
            written += len(text)
            entry += 1
        fh.write("</UniRef50>\n")
    return written + len(HEAD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{'XML MB':>8}{'floor s':>9}{'MB/s':>8}{'RSS MiB':>9}{'ours s':>9}{'MB/s':>8}"
          f"{'RSS MiB':>9}{'ours/floor':>11}")
    for mb in args.sizes_mb:
        xml = args.work / f"uniref50-{mb}MB.xml.gz"
        size_file = xml.with_suffix(".size")
        if not xml.exists() or not size_file.exists():
            size_file.write_text(str(generate(xml, mb << 20)))
        size = int(size_file.read_text()) / (1 << 20)
        floor_s, floor_rss = run_measured([sys.executable, "-c", FLOOR, str(xml)])
        ours_s, ours_rss = run_measured([sys.executable, "-c", OURS, str(xml),
                                         str(args.work / "uniref-membership.parquet")])
        print(f"{size:>8.0f}{floor_s:>9.1f}{size / floor_s:>8.1f}{floor_rss:>9.0f}"
              f"{ours_s:>9.1f}{size / ours_s:>8.1f}{ours_rss:>9.0f}{floor_s / ours_s:>11.2f}",
              flush=True)
    subprocess.run(["rm", "-f", str(args.work / "uniref-membership.parquet")], check=False)


if __name__ == "__main__":
    main()
