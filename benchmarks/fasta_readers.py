"""FASTA record splitting: the candidates for ingest's reader, against the decompression floor.

Usage: python benchmarks/fasta_readers.py [--n-sequences 4300000] [--work benchmarks/_work]
       [--runs 1]

Each variant reads the same generated FASTA.gz in its own process (peak RSS from the kernel) and
hands every record's header and sequence to Python, which is the least ingest needs:
  - gzip -dc > /dev/null                       (the floor the issue states)
  - isal igzip, read in 4 MiB blocks            (decompression alone, as ingest decompresses)
  - ours: pipeline.fasta.iter_raw_records       (isal in a thread + numpy splitting into arrays)
  - pyfastx.Fastx(comment=True)                 (kseq in C; name, sequence, comment tuples)
  - needletail.parse_fastx_file                 (Rust; Record objects: id, seq)
  - Biopython SimpleFastaParser                 (pure Python, the baseline's parser)
The compiled readers need the optional packages (pip install pyfastx needletail); a missing one
is reported and skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from _measure import generated_fasta, run_measured

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, tuple[str | None, str]] = {
    "isal igzip (decompress only)": (None, """
from isal import igzip
with igzip.open(PATH, "rb") as fh:
    while fh.read(4 << 20):
        pass
"""),
    "ours: iter_raw_records": (None, """
from pipeline.fasta import iter_raw_records
n = sum(len(chunk) for chunk in iter_raw_records(PATH))
"""),
    "pyfastx.Fastx": ("pyfastx", """
import pyfastx
n = 0
for name, seq, comment in pyfastx.Fastx(PATH, comment=True):
    n += 1
"""),
    "needletail": ("needletail", """
from needletail import parse_fastx_file
n = 0
for record in parse_fastx_file(PATH):
    header, seq = record.id, record.seq
    n += 1
"""),
    "Biopython SimpleFastaParser": ("Bio", """
import gzip
from Bio.SeqIO.FastaIO import SimpleFastaParser
with gzip.open(PATH, "rt") as fh:
    n = sum(1 for _ in SimpleFastaParser(fh))
"""),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-sequences", type=int, default=4_300_000)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    fasta = generated_fasta(args.work, args.n_sequences)
    gz_mb = fasta.stat().st_size / 1e6
    print(f"input: {fasta.name}: {gz_mb:.0f} MB gzip, {args.n_sequences:,} sequences; "
          f"{os.cpu_count()} CPUs; {args.runs} run(s) each, best shown")
    results: dict[str, tuple[float, float]] = {}
    for _ in range(args.runs):
        runs = {"gzip -dc > /dev/null (floor)": run_measured(
            ["gzip", "-dc", str(fasta)], stdout=subprocess.DEVNULL)}
        for name, (module, code) in VARIANTS.items():
            if module and importlib.util.find_spec(module) is None:
                print(f"  {name}: skipped ({module} is not installed)")
                continue
            script = f"import sys; sys.path.insert(0, {str(ROOT)!r}); PATH = {str(fasta)!r}\n"
            runs[name] = run_measured([sys.executable, "-c", script + code])
        for name, (wall, rss) in runs.items():
            best = results.get(name)
            results[name] = (wall, rss) if best is None or wall < best[0] else best
    floor = results["gzip -dc > /dev/null (floor)"][0]
    print(f"\n{'reader':<34}{'wall s':>8}{'x floor':>9}{'records/s':>12}{'peak RSS MiB':>14}")
    for name, (wall, rss) in results.items():
        print(f"{name:<34}{wall:>8.1f}{floor / wall:>9.2f}{args.n_sequences / wall:>12,.0f}"
              f"{rss:>14.0f}")


if __name__ == "__main__":
    main()
