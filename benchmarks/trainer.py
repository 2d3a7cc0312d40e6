"""Trainer throughput on this machine: ZeRO-3 over N ranks, tokens/s from the run's metrics.

Usage: python benchmarks/trainer.py [--data builds/sample] [--configs config/train/tiny.yaml
       config/train/8M.yaml] [--steps 20] [--nproc 2]

Runs `esm2-train train` under torchrun (DS_ACCELERATOR=cpu on a machine without GPUs) for a few
steps per config and prints the median real tokens/s over all ranks, skipping the first 3 steps, and
the model FLOPs/s that makes (training/model/flops.py; attention at the length-weighted mean of the
build's sequence lengths, cropped as the loader crops). With --peak-tflops (the hardware's dense
peak for the run's precision, all ranks together) it prints model FLOPs utilisation (MFU) too."""

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
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402
import torch  # noqa: E402

from training.config import load_train_config  # noqa: E402
from training.model.flops import attention_length, mfu, training_flops_per_token  # noqa: E402


def effective_length(lengths: pl.Series, max_residues: int) -> float:
    """Attention length (sum l^2 / sum l) of sequences cropped as the loader crops them."""
    return attention_length((lengths.clip(upper_bound=max_residues) + 2).to_list())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "builds" / "sample")
    ap.add_argument("--configs", type=Path, nargs="+",
                    default=[ROOT / "config/train/tiny.yaml", ROOT / "config/train/8M.yaml"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="peak dense TFLOP/s of all ranks together, for MFU (e.g. 989 per H100 "
                         "in bf16)")
    args = ap.parse_args()
    lengths = pl.read_parquet(args.data / "sequences.parquet", columns=["length"])["length"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ESM2_PROGRESS": "0"}
    if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator (gloo); GPUs: its default
        env.setdefault("DS_ACCELERATOR", "cpu")
    print(f"{'config':<12}{'ranks':>6}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>7}{'step s':>9}"
          f"{'loss first->last':>20}")
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
        cfg = load_train_config(config)
        per_token = training_flops_per_token(
            cfg.model.build(), effective_length(lengths, cfg.data.max_residues))
        flops = rate * per_token
        util = f"{mfu(rate, per_token, args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "-"
        print(f"{config.stem:<12}{args.nproc:>6}{rate:>12,.0f}{flops / 1e9:>10.1f}{util:>7}"
              f"{step:>9.2f}"
              f"{rows[0]['loss']:>10.3f} -> {rows[-1]['loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
