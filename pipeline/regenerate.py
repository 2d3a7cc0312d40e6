"""Rebuild a build's validation set from its manifest alone and check it byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.manifest import compare_outputs, load_manifest, manifest_config
from pipeline.stages import run_stage

STAGES = ("download", "ingest", "cluster", "split", "validation")


def regenerate_validation(
    manifest_file: str | Path, workdir: str | Path | None = None, keep: bool = False
) -> tuple[Path, list[str]]:
    """Run download → … → validation with the manifest's config and inputs in ``workdir``.

    Inputs are fetched with the checksums the manifest recorded. Returns the work directory and
    the differences between the regenerated ``validation/`` files and the manifest's.
    """
    manifest = load_manifest(manifest_file)
    cfg = manifest_config(manifest, str(manifest_file))
    recorded = {item["path"]: item for item in manifest["inputs"]}
    inputs = []
    for item in cfg.inputs:
        entry = recorded.get(item.file_name)
        if entry is None:
            raise PipelineError(f"{manifest_file}: no recorded input for {item.file_name}")
        inputs.append(item.model_copy(update={"sha256": entry["sha256"], "md5": None}))
    work = Path(workdir) if workdir else Path(cfg.out_dir).parent / f".regenerate-{cfg.build}"
    if work.resolve() == Path(cfg.out_dir).resolve():
        raise PipelineError(f"{work}: the work directory must not be the build's own out_dir")
    if work.exists():
        shutil.rmtree(work)
    local = cfg.model_copy(update={"out_dir": str(work), "inputs": inputs})
    for stage in STAGES:
        run_stage(stage, local)
    problems = compare_outputs(manifest["outputs"], work, prefix="validation/")
    if not keep and not problems:
        shutil.rmtree(work)
    return work, problems
