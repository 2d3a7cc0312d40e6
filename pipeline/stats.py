"""Summary statistics the stages report (stats/*.json)."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl


def size_stats(sizes: pl.Series) -> dict:
    """Summary and log2-binned histogram of cluster sizes."""
    arr = sizes.to_numpy()
    bins = np.floor(np.log2(arr)).astype(int)
    hist = np.bincount(bins)
    return {
        "clusters": len(arr),
        "singletons": int((arr == 1).sum()),
        "max": int(arr.max()),
        "mean": round(float(arr.mean()), 4),
        "median": float(np.median(arr)),
        "log2_histogram": {f"{2**i}-{2 ** (i + 1) - 1}": int(c) for i, c in enumerate(hist)},
    }


IDENTITY_BINS = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0001]


def identity_histogram(best: np.ndarray, queries: int) -> dict[str, int]:
    """Histogram of the best-hit identity of each query that has a hit (``best``), with the
    queries without one as ``no_hit``."""
    counts, _ = np.histogram(best, bins=IDENTITY_BINS)
    labels = [f"{lo:.2f}-{min(hi, 1.0):.2f}" for lo, hi in itertools.pairwise(IDENTITY_BINS)]
    return {"no_hit": queries - len(best), **dict(zip(labels, counts.tolist(), strict=True))}
