"""Loader throughput: real (non-pad) tokens per second from cluster shards to masked batches.

Usage: python benchmarks/loader.py [--data builds/sample] [--seconds 20] [--workers 0 2]

Runs the sample-level loader (``training.data.batches.make_loader``: global batches planned from the
split's arrays, samples read by index with wids, member draw, crop, masking, token-budget
micro-batches, collation) and, in the same run, the shard-streaming loader it replaced
(``benchmarks/_old_loader.py``) for a fixed time per setting; prints tokens/s overall and per
loading process (num_workers=0: the main process is the one loader) and the new/old ratio.
Targets: new/old >= 0.5 and >= 1M packed tokens/s per process.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._old_loader import make_old_loader  # noqa: E402
from pipeline.shards import shard_paths  # noqa: E402
from training.data.batches import DataConfig, make_loader  # noqa: E402


def measure(batches: Iterable[dict], seconds: float) -> tuple[float, int]:
    """Real tokens/s over ``seconds`` (worker start-up and the first batch not counted)."""
    tokens = count = 0
    start = None
    for batch in batches:
        if start is None:
            start = time.perf_counter()
            continue
        tokens += int((batch["input_ids"] != 1).sum())
        count += 1
        if time.perf_counter() - start >= seconds:
            break
    return tokens / (time.perf_counter() - start), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "builds" / "sample")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--tokens-per-batch", type=int, default=16_384)
    args = ap.parse_args()
    split = args.data / "shards" / "train"
    print(f"{args.data}: {len(shard_paths(split))} train shards")
    print(f"{'workers':>8}{'batching':>10}{'loader':>8}{'tokens/s':>12}{'per process':>13}"
          f"{'batches':>9}{'new/old':>9}")
    for workers in args.workers:
        for packed in (True, False):
            cfg = DataConfig(seed=0, tokens_per_batch=args.tokens_per_batch, packed=packed)
            rates = {}
            for name in ("new", "old"):
                loader = (make_loader(split, cfg, 4 * cfg.tokens_per_batch, num_workers=workers)
                          if name == "new" else
                          make_old_loader(shard_paths(split), cfg, num_workers=workers))
                rates[name], batches = measure(loader, args.seconds)
                ratio = f"{rates['new'] / rates['old']:.2f}" if name == "old" else ""
                print(f"{workers:>8}{'packed' if packed else 'padded':>10}{name:>8}"
                      f"{rates[name]:>12,.0f}{rates[name] / max(workers, 1):>13,.0f}"
                      f"{batches:>9}{ratio:>9}", flush=True)


if __name__ == "__main__":
    main()
