"""The build's stages by name: each is the ``run(cfg) -> stats`` of its module."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

from pipeline.config import BuildConfig

#: stage name (the ``esm2-data`` subcommand) -> the module whose ``run(cfg)`` it is
STAGES: dict[str, str] = {
    "download": "pipeline.download",
    "ingest": "pipeline.ingest",
    "cluster": "pipeline.cluster",
    "split": "pipeline.split",
    "check-leakage": "pipeline.leakage",
    "decontaminate": "pipeline.decontaminate",
    "shards": "pipeline.shards",
    "validation": "pipeline.validation",
}


def run_stage(name: str, cfg: BuildConfig, lock: str | None = None, **options: object) -> dict:
    """Run one stage of a build, holding its lock on the build directory (``lock``: the lock's
    name where parts of one stage run side by side); ``options`` go to the stage."""
    from pipeline.atomic import stage_lock

    stage = importlib.import_module(STAGES[name])  # imported on use: a quick CLI start
    with stage_lock(cfg.out_dir, lock or name), mmseqs_runner(cfg.cluster.runner):
        return stage.run(cfg, **options)


@contextlib.contextmanager
def mmseqs_runner(runner: str | None) -> Iterator[None]:
    """Set MMseqs2's ``RUNNER`` (the config's ``cluster.runner``) for a stage's MMseqs2 runs."""
    if runner is None:
        yield
        return
    saved = os.environ.get("RUNNER")
    os.environ["RUNNER"] = runner
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RUNNER", None)
        else:
            os.environ["RUNNER"] = saved
