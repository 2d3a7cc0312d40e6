"""Leakage study of split linking: none / the clustering's alignments / a separate search.

Usage: python benchmarks/linking.py [--inputs F.fasta.gz ...] [--generated N] [--work DIR]

Ingests the inputs (default: the real families of ../shared/data, the OpenFold UniProt and
UniRef90 hits plus the MMseqs2 examples) or N generated family sequences, clusters them once
(timing the extraction of the UniRef50 clustering's cross-cluster alignments separately), then
splits them three ways (10% valid, 10% test) and runs the leakage check on each split: the
held-out sequences with a >= 50% identity train hit (80% coverage of the held-out sequence) and
the split stage's time per method.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cluster import cluster  # noqa: E402
from pipeline.config import parse_config  # noqa: E402
from pipeline.ingest import ingest  # noqa: E402
from pipeline.leakage import check_leakage  # noqa: E402
from pipeline.split import split  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
REAL = ["openfold_msa_uniprot_hits.fasta.gz", "openfold_msa_uniref90_hits.fasta.gz",
        "mmseqs2_examples_db.fasta.gz", "mmseqs2_examples_query.fasta.gz"]
METHODS = {
    "none": {"link_identity": None},
    "alignments": {"link_identity": 0.5, "link_method": "alignments"},
    "search": {"link_identity": 0.5, "link_method": "search", "link_queries": "uniref90",
               "link_sensitivity": 5.7, "link_max_seqs": 100},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=Path, nargs="*", default=None)
    ap.add_argument("--generated", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "linking")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--uniref50-sensitivity", type=float, default=None,
                    help="MMseqs2 -s of the UniRef50 clustering (default: MMseqs2's, 4)")
    ap.add_argument("--uniref50-max-seqs", type=int, default=None,
                    help="MMseqs2 --max-seqs of the UniRef50 clustering (default: MMseqs2's, 20)")
    ap.add_argument("--uniref50-args", default="",
                    help="more MMseqs2 arguments of the UniRef50 clustering, e.g. "
                         "'--single-step-clustering 1'")
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS),
                    help="linking methods to compare (default: all three; none given: time the "
                         "clustering only)")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    if args.generated:
        fasta = args.work / f"families-{args.generated}.fasta.gz"
        subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--n",
                        str(args.generated), "--out", str(fasta)], check=True)
        inputs = [fasta]
    else:
        inputs = args.inputs or [SHARED / name for name in REAL]
    out = args.work / "build"
    base = {"build": "linking", "out_dir": str(out), "threads": args.threads,
            "inputs": [{"url": str(p)} for p in inputs],
            "leakage": {"max_queries": 20000, "max_fraction": 1.0}}
    uniref50 = {"method": "cluster", "min_seq_id": 0.5, "sensitivity": args.uniref50_sensitivity,
                "extra_args": ([] if args.uniref50_max_seqs is None
                               else ["--max-seqs", str(args.uniref50_max_seqs)])
                              + args.uniref50_args.split()}
    base["cluster"] = {"uniref50": uniref50}
    cfg = parse_config({**base, "split": {"valid_fraction": 0.1, "test_fraction": 0.1}})
    ingest(inputs, out, on_error="skip")
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("pipeline.cluster").addHandler(handler)
    logging.getLogger("pipeline.cluster").setLevel(logging.INFO)
    start = time.perf_counter()
    stats = cluster(out, cfg.cluster, args.threads)
    cluster_s = time.perf_counter() - start
    links_s = float(next(m for m in logged if m.startswith("alignment links")).split()[-2])
    print(f"{', '.join(p.name for p in inputs)}: {stats['sequences']:,} sequences, "
          f"{stats['uniref50']['clusters']:,} UniRef50 clusters, cluster stage {cluster_s:.1f} s "
          f"(alignment links: {stats['alignment_links']:,} pairs, {links_s:.2f} s to extract, "
          f"{links_s / cluster_s:.1%} of the stage)")
    print(f"{'linking':<12}{'links':>8}{'groups':>8}{'split s':>9}{'held-out':>10}"
          f"{'>=50% hit':>11}{'fraction':>10}")
    for name in args.methods:
        link = METHODS[name]
        cfg = parse_config({**base, "split": {"valid_fraction": 0.1, "test_fraction": 0.1,
                                              **link}})
        start = time.perf_counter()
        s = split(out, cfg.split, cfg.seed, args.threads, cfg.cluster.mmseqs)
        split_s = time.perf_counter() - start
        report = check_leakage(out, cfg.leakage, cfg.seed, args.threads, cfg.cluster.mmseqs)
        print(f"{name:<12}{s['cluster_links']:>8,}{s['split_groups']:>8,}{split_s:>9.1f}"
              f"{report['queries']:>10,}{report['at_or_above_threshold']:>11,}"
              f"{report['fraction_at_or_above_threshold']:>10.2%}", flush=True)
    (args.work / "done.json").write_text(json.dumps({"cluster_s": cluster_s}))


if __name__ == "__main__":
    main()
