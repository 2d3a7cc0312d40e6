"""Loader throughput: real (non-pad) tokens per second from cluster shards to masked batches.

Usage: python benchmarks/loader.py [--data builds/sample] [--seconds 20] [--workers 0 2]

Reads the build's train shards through `training.data.make_loader` (WebDataset decoding via
pipeline.shards, member draw, crop, masking, token-budget batching, collation) for a fixed time per
setting and prints tokens/s overall and per worker process (num_workers=0: the main process is the
one worker). Target: >= 200k tokens/s per core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from training.data import DataConfig, make_loader, split_shards

ROOT = Path(__file__).resolve().parents[1]


def measure(shards: list[Path], workers: int, seconds: float, packed: bool) -> tuple[float, int]:
    cfg = DataConfig(seed=0, tokens_per_batch=16_384, packed=packed)
    tokens = batches = 0
    start = None
    for batch in make_loader(shards, cfg, num_workers=workers):
        if start is None:  # don't count worker start-up
            start = time.perf_counter()
            continue
        tokens += int((batch["input_ids"] != 1).sum())
        batches += 1
        if time.perf_counter() - start >= seconds:
            break
    return tokens / (time.perf_counter() - start), batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "builds" / "sample")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()
    shards = split_shards(args.data, "train")
    print(f"{args.data}: {len(shards)} train shards")
    print(f"{'workers':>8}{'batching':>10}{'tokens/s':>12}{'per worker':>12}{'batches':>9}")
    for workers in args.workers:
        for packed in (True, False):
            rate, batches = measure(shards, workers, args.seconds, packed)
            per = rate / max(workers, 1)
            print(f"{workers:>8}{'packed' if packed else 'padded':>10}{rate:>12,.0f}"
                  f"{per:>12,.0f}{batches:>9}", flush=True)


if __name__ == "__main__":
    main()
