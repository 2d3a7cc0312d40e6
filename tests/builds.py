"""Helpers that run build stages into a temporary directory for tests."""

from __future__ import annotations

from pathlib import Path

from pipeline.cluster import cluster
from pipeline.config import BuildConfig, parse_config
from pipeline.ingest import ingest
from pipeline.leakage import check_leakage
from pipeline.split import split


def build_config(out: Path, inputs: list[Path], **sections: object) -> BuildConfig:
    data = {
        "build": "test",
        "out_dir": str(out),
        "inputs": [{"url": str(p)} for p in inputs],
        "split": {"valid_fraction": 0.1, "test_fraction": 0.1},
        **sections,
    }
    return parse_config(data)


def run_through_split(cfg: BuildConfig, inputs: list[Path]) -> None:
    """ingest → cluster → split into ``cfg.out_dir``."""
    ingest(inputs, cfg.out_dir)
    cluster(cfg.out_dir, cfg.cluster, cfg.threads)
    split(cfg.out_dir, cfg.split, cfg.seed, cfg.threads, cfg.cluster.mmseqs)


def run_leakage(cfg: BuildConfig) -> dict:
    return check_leakage(cfg.out_dir, cfg.leakage, cfg.seed, cfg.threads, cfg.cluster.mmseqs)
