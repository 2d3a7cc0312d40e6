"""Summary statistics the stages report (stats/*.json)."""

from __future__ import annotations

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
