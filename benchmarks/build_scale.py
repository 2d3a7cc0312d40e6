"""Whole-build scale run: wall time and peak RSS of every stage on generated family data.

Usage: python benchmarks/build_scale.py [--sizes 100000 1000000] [--work benchmarks/_work]

Each stage runs as `esm2-data <stage> --config ...` in its own process; peak RSS is the
kernel's maxrss of that process and its children (MMseqs2 included). The cluster and split
stages use config/uniprot.yaml's clustering and linking settings (--no-link: MMseqs2's defaults,
no linking). Target: peak RSS under 4 GB at 1M sequences and growing
sublinearly with size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from _measure import mmseqs_seconds, run_measured

ROOT = Path(__file__).resolve().parents[1]
# The full-UniProt config's linking and clustering settings (the ones meant for scale).
UNIPROT = yaml.safe_load((ROOT / "config" / "uniprot.yaml").read_text())
UNIPROT_SPLIT, UNIPROT_CLUSTER = UNIPROT["split"], UNIPROT["cluster"]
MMSEQS_LOGS = {"cluster": "cluster", "split": "split", "check-leakage": "leakage"}
STAGES = ("download", "ingest", "cluster", "split", "check-leakage", "shards", "validation",
          "manifest")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-link", action="store_true",
                    help="split per UniRef50 cluster (link_identity: null): no linking search")
    args = ap.parse_args()
    split_cfg = {**UNIPROT_SPLIT, "valid_fraction": 0.01, "test_fraction": 0.01}
    # Generated families straddle UniRef50 clusters more than real ones (46% of held-out
    # sequences have a >= 50% train hit without linking, ~10% with): report, do not fail.
    leakage_cfg = {"max_queries": 2000, "max_fraction": 1.0}
    cluster_cfg = UNIPROT_CLUSTER
    if args.no_link:  # the design's rule with MMseqs2's default (cascaded) clustering
        split_cfg["link_identity"] = None
        cluster_cfg = {}
    table = {}
    for n in args.sizes:
        fasta = args.work / f"families-{n}.fasta.gz"
        if not fasta.exists():
            subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--n", str(n),
                            "--out", str(fasta)], check=True)
        out = args.work / f"scale-{n}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = {
            "build": f"scale-{n}", "out_dir": str(out), "threads": args.threads,
            "inputs": [{"url": str(fasta)}], "manifest_dir": str(out / "manifest"),
            "cluster": cluster_cfg,
            "split": split_cfg,
            "leakage": leakage_cfg,
            "validation": {"size": 1000},
        }
        cfg_path = args.work / f"scale-{n}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        rows = {}
        for stage in STAGES:
            wall, rss = run_measured([sys.executable, "-m", "pipeline.cli", stage, "--config",
                                      str(cfg_path)])
            log = out / "logs" / f"{MMSEQS_LOGS.get(stage, stage)}.mmseqs.log"
            rows[stage] = (wall, rss, mmseqs_seconds(log))
            print(f"n={n} {stage:<14} {wall:8.1f} s {rss:8.0f} MiB "
                  f"(MMseqs2 {rows[stage][2]:.1f} s)", flush=True)
        table[n] = rows
        leak = json.loads((out / "stats" / "leakage.json").read_text())
        split = json.loads((out / "stats" / "split.json").read_text())
        print(f"n={n} linking {split['linking']}: {split['cluster_links']:,} links, "
              f"{split['split_groups']:,} split groups; held-out with a >= 50% train hit: "
              f"{leak['at_or_above_threshold']:,} of {leak['queries']:,} "
              f"({leak['fraction_at_or_above_threshold']:.2%})", flush=True)
    sizes = list(table)
    print(f"\n{'stage':<14}" + "".join(f"{f'{n:,} s':>14}{'MMseqs2 s':>11}{'MiB':>8}"
                                       for n in sizes))
    for stage in STAGES:
        print(f"{stage:<14}" + "".join(
            f"{table[n][stage][0]:>14.1f}{table[n][stage][2]:>11.1f}{table[n][stage][1]:>8.0f}"
            for n in sizes))
    print(f"{'total':<14}" + "".join(
        f"{sum(v[0] for v in table[n].values()):>14.1f}"
        f"{sum(v[2] for v in table[n].values()):>11.1f}"
        f"{max(v[1] for v in table[n].values()):>8.0f}" for n in sizes))
    for n in sizes:
        wall, _, inside = table[n]["cluster"]
        print(f"cluster overhead at {n:,}: {(wall - inside) / inside:.1%} of MMseqs2 time")


if __name__ == "__main__":
    main()
