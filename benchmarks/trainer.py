"""Trainer throughput on this machine: ZeRO-3 over N ranks, tokens/s from the run's metrics.

Usage: python benchmarks/trainer.py [--data builds/sample] [--configs config/train/tiny.yaml
       config/train/8M.yaml] [--steps 20] [--nproc 2]

Runs `esm2-train train` under torchrun (DS_ACCELERATOR=cpu on a machine without GPUs) for a few
steps per config and prints the median real tokens/s over all ranks, skipping the first 3 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "builds" / "sample")
    ap.add_argument("--configs", type=Path, nargs="+",
                    default=[ROOT / "config/train/tiny.yaml", ROOT / "config/train/8M.yaml"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ESM2_PROGRESS": "0"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    print(f"{'config':<12}{'ranks':>6}{'tokens/s':>12}{'step s':>9}{'loss first->last':>20}")
    for config in args.configs:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(args.nproc), "-m", "training.cli", "train", "--config", str(config),
                   "--data", str(args.data), "--out", out, "--steps", str(args.steps),
                   "--no-progress"]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in rows[3:] if "val_loss" not in r]
        rate = statistics.median(rates)
        step = statistics.median(r["tokens"] / r["tokens_per_s"] for r in rows[3:])
        print(f"{config.stem:<12}{args.nproc:>6}{rate:>12,.0f}{step:>9.2f}"
              f"{rows[0]['loss']:>10.3f} -> {rows[-1]['loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
