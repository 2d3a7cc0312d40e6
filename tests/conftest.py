"""Session fixtures: one Snakemake build of the embedded sample, shared by the build tests."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO


@dataclass(frozen=True)
class SampleBuild:
    root: Path  # Snakemake working directory
    config: Path  # the config file used
    out: Path  # out_dir
    manifest: Path


def sample_config(root: Path) -> Path:
    """config/sample.yaml with absolute input paths and outputs under ``root``."""
    cfg = yaml.safe_load((REPO / "config" / "sample.yaml").read_text())
    for item in cfg["inputs"]:
        item["url"] = str(REPO / item["url"])
    cfg["out_dir"] = "build"  # relative to Snakemake's --directory (root): a copied build
    cfg["manifest_dir"] = "manifests"  # with its config is the same build
    path = root / "sample.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(
    root: Path, config: Path, *extra: str, **kwargs
) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(root), "--cores", "2", "--configfile", str(config),
           "--rerun-incomplete", *extra]
    if kwargs.pop("background", False):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, **kwargs)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory: pytest.TempPathFactory) -> SampleBuild:
    root = tmp_path_factory.mktemp("sample-build")
    config = sample_config(root)
    result = snakemake(root, config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SampleBuild(root, config, root / "build", root / "manifests" / "sample.json")


# Modules whose tests build datasets with MMseqs2 or start DeepSpeed ranks (minutes, not seconds).
HEAVY_MODULES = {"test_build", "test_cluster", "test_decontaminate", "test_train"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the heavy tests (``make test-fast`` runs the rest): those of HEAVY_MODULES and any
    that uses the sample build."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in HEAVY_MODULES or "sample_build" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture
def scan() -> object:
    """The compiled ingest kernels (pipeline._scan); the test skips where they are not built."""
    from pipeline import kernels as module

    if module.SCAN is None:
        pytest.skip("pipeline._scan is not built (no C compiler at install, or "
                    "ESM2_NUMPY_KERNELS is set)")
    return module.SCAN


@pytest.fixture(params=["compiled", "numpy"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled ingest kernels (pipeline/_scan.c) and with their numpy
    twins: both must give the same results."""
    if request.param == "compiled":
        request.getfixturevalue("scan")
    else:
        from pipeline import kernels as module

        monkeypatch.setattr(module, "SCAN", None)
    return request.param
