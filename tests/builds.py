"""Build configs for tests and running a build's stages into a temporary directory."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BuildConfig, parse_config
from pipeline.stages import run_stage


def build_config(out: Path, inputs: list[Path], **sections: object) -> BuildConfig:
    data = {
        "build": "test",
        "out_dir": str(out),
        "inputs": [{"url": str(p)} for p in inputs],
        "split": {"valid_fraction": 0.1, "test_fraction": 0.1},
        **sections,
    }
    return parse_config(data)


def run_stages(cfg: BuildConfig, *stages: str) -> list[dict]:
    """Run the named stages of ``cfg``'s build in order (as ``esm2-data <stage>`` does)."""
    return [run_stage(stage, cfg) for stage in stages]


def run_through_split(cfg: BuildConfig) -> None:
    """download → ingest → cluster → split into ``cfg.out_dir``."""
    run_stages(cfg, "download", "ingest", "cluster", "split")


def run_leakage(cfg: BuildConfig) -> dict:
    return run_stage("check-leakage", cfg)
