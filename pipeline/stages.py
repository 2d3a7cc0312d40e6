"""The build's stages by name, each a call into its module with the config's settings."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from pipeline.config import BuildConfig


def _download(cfg: BuildConfig) -> dict:
    from pipeline.download import run_download

    return run_download(cfg)


def _ingest(cfg: BuildConfig, part: int | None = None, merge: bool = False) -> dict:
    """All inputs in one process; or one input (``part``), or the merge of all parts, so that
    a build's inputs are parsed as parallel jobs (the Snakefile's ``ingest_part`` rule)."""
    from pipeline.ingest import ingest, ingest_part, merge_parts

    opts = cfg.ingest
    inputs = [cfg.raw_path(item) for item in cfg.inputs]
    if part is not None:
        return ingest_part(inputs, part, cfg.out.ingest_part(part), on_error=opts.on_error,
                           chunk_bytes=opts.chunk_bytes, bucket_bytes=opts.bucket_bytes)
    if merge:
        parts = [cfg.out.ingest_part(i) for i in range(len(inputs))]
        return merge_parts(inputs, parts, cfg.out_dir, on_error=opts.on_error,
                           row_group_rows=opts.row_group_rows)
    return ingest(
        inputs, cfg.out_dir, on_error=opts.on_error,
        chunk_bytes=opts.chunk_bytes, row_group_rows=opts.row_group_rows,
        bucket_bytes=opts.bucket_bytes,
    )


def _cluster(cfg: BuildConfig) -> dict:
    from pipeline.cluster import cluster

    return cluster(cfg.out_dir, cfg.cluster, cfg.threads)


def _split(cfg: BuildConfig) -> dict:
    from pipeline.split import split

    return split(cfg.out_dir, cfg.split, cfg.seed, cfg.threads, cfg.cluster.mmseqs)


def _leakage(cfg: BuildConfig) -> dict:
    from pipeline.leakage import check_leakage

    return check_leakage(cfg.out_dir, cfg.leakage, cfg.seed, cfg.threads, cfg.cluster.mmseqs)


def _shards(cfg: BuildConfig) -> dict:
    from pipeline.shards import write_shards

    return write_shards(cfg.out_dir, cfg.shards, cfg.seed)


def _validation(cfg: BuildConfig) -> dict:
    from pipeline.validation import write_validation

    return write_validation(cfg.out_dir, cfg.validation, cfg.seed)


STAGES: dict[str, Callable[..., dict]] = {
    "download": _download,
    "ingest": _ingest,
    "cluster": _cluster,
    "split": _split,
    "check-leakage": _leakage,
    "shards": _shards,
    "validation": _validation,
}


def run_stage(name: str, cfg: BuildConfig, lock: str | None = None, **options: object) -> dict:
    """Run one stage of a build, holding its lock on the build directory (``lock``: the lock's
    name where parts of one stage run side by side); ``options`` go to the stage."""
    from pipeline.atomic import stage_lock

    with stage_lock(cfg.out_dir, lock or name), mmseqs_runner(cfg.cluster.runner):
        return STAGES[name](cfg, **options)


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
