"""Ingest throughput and memory: esm2-data ingest vs Biopython and vs `gzip -dc`, in one run.

Usage: python benchmarks/ingest.py [--n-sequences 4300000] [--work benchmarks/_work]

1. Generates (once, cached) a synthetic-family FASTA.gz of >= 500 MB.
2. Times, each in its own subprocess (peak RSS from the kernel's rusage):
   - floor:     gzip -dc FILE > /dev/null
   - biopython: Bio.SeqIO.parse -> pyarrow ParquetWriter (id, description, sequence)
   - ingest:    pipeline.ingest.ingest (validation, header parsing, md5, dedup, stats)
3. Peak RSS of `ingest` on plain FASTA prefixes of ~100 MB and ~1 GB (flat = bounded memory).
Prints a table and the ratios the issue's targets are stated in.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from _measure import generated_fasta, run_measured

ROOT = Path(__file__).resolve().parents[1]

BIOPYTHON = r"""
import gzip, sys
import pyarrow as pa, pyarrow.parquet as pq
from Bio import SeqIO
schema = pa.schema([("id", pa.string()), ("description", pa.string()), ("sequence", pa.string())])
writer = pq.ParquetWriter(sys.argv[2], schema, compression="zstd")
cols = ([], [], [])
def flush():
    writer.write_table(pa.table(dict(zip(schema.names, cols)), schema=schema))
    for c in cols: c.clear()
with gzip.open(sys.argv[1], "rt") as fh:
    for rec in SeqIO.parse(fh, "fasta"):
        cols[0].append(rec.id); cols[1].append(rec.description); cols[2].append(str(rec.seq))
        if len(cols[0]) == 100_000: flush()
if cols[0]: flush()
writer.close()
"""

INGEST = r"""
import sys
from pipeline.config import IngestConfig
from pipeline.ingest import ingest
opts = IngestConfig()  # the defaults a build uses
ingest([sys.argv[1]], sys.argv[2], chunk_bytes=opts.chunk_bytes, bucket_bytes=opts.bucket_bytes,
       row_group_rows=opts.row_group_rows)
"""


def plain_prefix(src: Path, dest: Path, nbytes: int) -> Path:
    """The first ~nbytes of decompressed FASTA, cut at a record boundary."""
    if dest.exists():
        return dest
    import gzip

    with gzip.open(src, "rb") as fin, open(dest.with_suffix(".tmp"), "wb") as fout:
        done = 0
        while done < nbytes:
            block = fin.read(16 << 20)
            if not block:
                break
            if done + len(block) >= nbytes:
                cut = block.rfind(b"\n>", 0, nbytes - done + 1)
                block = block[: cut + 1] if cut > 0 else block
                fout.write(block)
                break
            fout.write(block)
            done += len(block)
    dest.with_suffix(".tmp").rename(dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-sequences", type=int, default=4_300_000)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    ap.add_argument("--skip-rss", action="store_true", help="skip the 100 MB / 1 GB RSS runs")
    args = ap.parse_args()
    fasta = generated_fasta(args.work, args.n_sequences)
    gz_mb = fasta.stat().st_size / 1e6
    raw_mb = int(subprocess.run(f"gzip -dc {fasta} | wc -c", shell=True, check=True,
                                capture_output=True, text=True).stdout) / 1e6
    print(f"input: {fasta.name}: {gz_mb:.0f} MB gzip, {raw_mb:.0f} MB FASTA, "
          f"{args.n_sequences} sequences; {os.cpu_count()} CPUs")

    results = {}
    results["gzip -dc (floor)"] = run_measured(
        ["gzip", "-dc", str(fasta)], stdout=subprocess.DEVNULL)
    results["biopython+pyarrow"] = run_measured(
        [sys.executable, "-c", BIOPYTHON, str(fasta), str(args.work / "bio.parquet")])
    results["esm2-data ingest"] = run_measured(
        [sys.executable, "-c", INGEST, str(fasta), str(args.work / "ingest-out")])
    print(f"\n{'variant':<22}{'wall s':>9}{'MB/s (gz)':>11}{'MB/s (FASTA)':>14}"
          f"{'seq/s':>12}{'peak RSS MiB':>14}")
    for name, (wall, rss) in results.items():
        print(f"{name:<22}{wall:>9.1f}{gz_mb / wall:>11.1f}{raw_mb / wall:>14.1f}"
              f"{args.n_sequences / wall:>12,.0f}{rss:>14.0f}")
    ours = results["esm2-data ingest"][0]
    print(f"\ningest vs biopython: {results['biopython+pyarrow'][0] / ours:.2f}x (target >= 3x)")
    print(f"ingest vs gzip -dc floor: {results['gzip -dc (floor)'][0] / ours:.2f}x "
          f"(target >= 0.5x)")

    if not args.skip_rss:
        print("\npeak RSS of ingest vs input size (plain FASTA prefixes):")
        for label, size in (("100 MB", 100_000_000), ("1 GB", 1_000_000_000)):
            part = plain_prefix(fasta, args.work / f"prefix-{label.replace(' ', '')}.fasta", size)
            wall, rss = run_measured(
                [sys.executable, "-c", INGEST, str(part), str(args.work / "rss-out")])
            print(f"  {label:>6} ({part.stat().st_size / 1e6:.0f} MB): {wall:6.1f} s, "
                  f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
