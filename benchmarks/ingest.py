"""Ingest throughput and memory: esm2-data ingest vs Biopython and vs `gzip -dc`, in one run.

Usage: python benchmarks/ingest.py [--n-sequences 1000000] [--runs 3] [--work benchmarks/_work]

1. Generates (once, cached) a synthetic-family FASTA.gz (1M sequences: 124 MB gz, 466 MB FASTA).
2. Times, each in its own subprocess, ``--runs`` times in turn (peak memory: the largest summed
   RSS of the process and its workers, or the kernel's maxrss if larger; the input read
   into the page cache just before each run):
   - floor:     gzip -dc FILE > /dev/null
   - biopython: Bio.SeqIO.parse -> pyarrow ParquetWriter (id, description, sequence)
   - ingest:    `esm2-data ingest FILE --out DIR` (validation, header parsing, md5, dedup,
                stats) with 1 worker, and with one worker per CPU as threads (the default) and
                as processes,
                and the default again on the numpy path (ESM2_NUMPY_KERNELS=1: without the
                compiled kernels of pipeline/_scan.c; same outputs)
3. Peak memory of the default ingest on plain FASTA prefixes of ~100 MB and ~1 GB of a larger
   generated file (flat = bounded memory).
Prints a table (best of the runs, and the spread) and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from subprocess import DEVNULL

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


def ingest_command(fasta: Path, out: Path, threads: int, kind: str) -> list[str]:
    """``esm2-data ingest`` as a user runs it (the build's ingest defaults)."""
    script = Path(sys.executable).with_name("esm2-data")
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    return [*cli, "ingest", str(fasta), "--out", str(out), "--threads", str(threads),
            "--worker-kind", kind]


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
    ap.add_argument("--n-sequences", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    ap.add_argument("--skip-rss", action="store_true", help="skip the 100 MB / 1 GB memory runs")
    ap.add_argument("--cold", action="store_true",
                    help="do not read the input into the page cache before each run")
    ap.add_argument("--rss-n-sequences", type=int, default=2_300_000,
                    help="sequences of the file the 100 MB / 1 GB prefixes are cut from")
    args = ap.parse_args()
    fasta = generated_fasta(args.work, args.n_sequences)
    gz_mb = fasta.stat().st_size / 1e6
    raw_mb = int(subprocess.run(f"gzip -dc {fasta} | wc -c", shell=True, check=True,
                                capture_output=True, text=True).stdout) / 1e6
    cpus = len(os.sched_getaffinity(0))
    print(f"input: {fasta.name}: {gz_mb:.0f} MB gzip, {raw_mb:.0f} MB FASTA, "
          f"{args.n_sequences} sequences; {cpus} CPUs; best of {args.runs} runs")

    out, bio_out = args.work / "ingest-out", args.work / "bio.parquet"
    variants = {
        "gzip -dc (floor)": (["gzip", "-dc", str(fasta)], DEVNULL),
        "biopython+pyarrow": ([sys.executable, "-c", BIOPYTHON, str(fasta), str(bio_out)], None),
        "ingest, 1 worker": (ingest_command(fasta, out, 1, "thread"), DEVNULL),
        f"ingest, {cpus} threads": (ingest_command(fasta, out, cpus, "thread"), DEVNULL),
        f"ingest, {cpus} processes": (ingest_command(fasta, out, cpus, "process"), DEVNULL),
        f"ingest, {cpus} thr., numpy": (ingest_command(fasta, out, cpus, "thread"), DEVNULL),
    }
    env = {f"ingest, {cpus} thr., numpy": {"ESM2_NUMPY_KERNELS": "1"}}
    warm = () if args.cold else (fasta,)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.runs):  # interleaved, so a slow spell of the machine hits every variant
        for name, (cmd, stdout) in variants.items():
            runs[name].append(run_measured(cmd, stdout=stdout, env=env.get(name),
                                           outputs=(out, bio_out), warm=warm))
    print(f"\n{'variant':<24}{'wall s':>8}{'spread s':>14}{'MB/s (FASTA)':>14}"
          f"{'seq/s':>12}{'peak MiB':>10}")
    best = {}
    for name, rs in runs.items():
        walls = [w for w, _ in rs]
        best[name] = min(walls)
        print(f"{name:<24}{best[name]:>8.1f}{f'{min(walls):.1f}-{max(walls):.1f}':>14}"
              f"{raw_mb / best[name]:>14.1f}{args.n_sequences / best[name]:>12,.0f}"
              f"{max(r for _, r in rs):>10.0f}")
    bio, floor = best["biopython+pyarrow"], best["gzip -dc (floor)"]
    for name in list(variants)[2:]:
        print(f"{name}: {bio / best[name]:.2f}x biopython (target >= 3x), "
              f"{floor / best[name]:.2f}x gzip -dc (target >= 0.5x), peak memory "
              f"{max(r for _, r in runs[name]) / max(r for _, r in runs['biopython+pyarrow']):.2f}"
              f"x biopython's (target <= 1.5x)")
    compiled, numpy_path = best[f"ingest, {cpus} threads"], best[f"ingest, {cpus} thr., numpy"]
    print(f"compiled kernels vs the numpy path ({cpus} threads): {numpy_path / compiled:.2f}x")

    if not args.skip_rss:
        print("\npeak memory of the default ingest vs input size (plain FASTA prefixes):")
        big = generated_fasta(args.work, args.rss_n_sequences)
        for label, size in (("100 MB", 100_000_000), ("1 GB", 1_000_000_000)):
            part = plain_prefix(big, args.work / f"prefix-{label.replace(' ', '')}.fasta", size)
            rss_out = args.work / "rss-out"
            wall, rss = run_measured(
                ingest_command(part, rss_out, cpus, "thread"), DEVNULL, outputs=(rss_out,),
                warm=() if args.cold else (part,))
            print(f"  {label:>6} ({part.stat().st_size / 1e6:.0f} MB): {wall:6.1f} s, "
                  f"peak {rss:.0f} MiB")


if __name__ == "__main__":
    main()
