"""Clustering stage overhead: `esm2-data cluster` vs the raw MMseqs2 commands, in one run.

Usage: python benchmarks/cluster.py [--sizes 100000 1000000] [--work benchmarks/_work]

For each size, generated family sequences are ingested (not timed), then, each in its own
subprocess (wall time and peak RSS from the kernel's rusage):
  - raw:   mmseqs createdb → linclust 90% → createsubdb (reps) → cluster 50% → createtsv, alone;
  - stage: pipeline.cluster.cluster (FASTA export, the same MMseqs2 passes, joins, Parquet).
Overhead = stage wall time − the MMseqs2 commands' own wall time inside the same stage run (timed
in its log), as a fraction of the latter (target <= 15%); the separate raw run is printed too,
but on a shared machine its time drifts with load. Also the growth from size to size.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
from pathlib import Path

from _measure import mmseqs_seconds, run_measured

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RAW = r"""
set -euo pipefail
MM="$1"; FASTA="$2"; W="$3"; T="$4"
"$MM" createdb "$FASTA" "$W/db" --dbtype 1 --shuffle 0 >/dev/null
"$MM" linclust "$W/db" "$W/c90" "$W/tmp" --min-seq-id 0.9 -c 0.8 --cov-mode 1 \
  --cluster-mode 2 --threads "$T" >/dev/null
"$MM" createsubdb "$W/c90" "$W/db" "$W/rep90" >/dev/null
"$MM" cluster "$W/rep90" "$W/c50" "$W/tmp" --min-seq-id 0.5 -c 0.8 --cov-mode 1 \
  --cluster-mode 2 --threads "$T" >/dev/null
"$MM" createtsv "$W/db" "$W/db" "$W/c90" "$W/c90.tsv" --threads "$T" >/dev/null
"$MM" createtsv "$W/rep90" "$W/rep90" "$W/c50" "$W/c50.tsv" --threads "$T" >/dev/null
"""

STAGE = r"""
import sys
from pipeline.cluster import cluster
from pipeline.config import ClusterConfig
cluster(sys.argv[1], ClusterConfig(), int(sys.argv[2]))
"""


def main() -> None:
    from pipeline.generate import write_families
    from pipeline.ingest import ingest
    from pipeline.mmseqs import find_mmseqs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    args = ap.parse_args()
    mm = str(find_mmseqs())
    rows = []
    for n in args.sizes:
        base = args.work / f"cluster-{n}"
        fasta = args.work / f"families-{n}.fasta.gz"
        if not fasta.exists():
            write_families(fasta, n, seed=0)
        if not (base / "sequences.parquet").exists():
            ingest([fasta], base)
        raw_fasta = base / "unique.fasta"
        if not raw_fasta.exists():
            from pipeline.mmseqs import write_indexed_fasta

            write_indexed_fasta(base / "sequences.parquet", raw_fasta)
        work = base / "raw"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        raw = run_measured(
            ["bash", "-c", RAW, "raw", mm, str(raw_fasta), str(work), str(args.threads)])
        shutil.rmtree(work, ignore_errors=True)
        stage = run_measured([sys.executable, "-c", STAGE, str(base), str(args.threads)])
        inside = mmseqs_seconds(base / "logs" / "cluster.mmseqs.log")
        rows.append((n, raw, stage, inside))
        print(f"n={n}: raw mmseqs {raw[0]:.1f} s ({raw[1]:.0f} MiB), "
              f"stage {stage[0]:.1f} s ({stage[1]:.0f} MiB)", flush=True)
    print(f"\n{'sequences':>10}{'raw s':>9}{'stage s':>9}{'mmseqs in stage':>16}"
          f"{'overhead':>10}{'raw MiB':>9}{'stage MiB':>10}")
    for n, raw, stage, inside in rows:
        print(f"{n:>10}{raw[0]:>9.1f}{stage[0]:>9.1f}{inside:>16.1f}"
              f"{(stage[0] - inside) / inside:>10.1%}{raw[1]:>9.0f}{stage[1]:>10.0f}")
    print("overhead = (stage wall - MMseqs2 time inside the stage) / MMseqs2 time inside the stage")
    for (n0, _, s0, _), (n1, _, s1, _) in itertools.pairwise(rows):
        print(f"stage time x{s1[0] / s0[0]:.1f} for x{n1 / n0:.0f} sequences")


if __name__ == "__main__":
    main()
