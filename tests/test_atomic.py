"""Atomic outputs: complete or absent, never half-written; stale temporaries cleaned up."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.atomic import atomic_dir, atomic_path, scratch_dir, write_text_atomic
from pipeline.errors import OutputExistsError


def test_atomic_path_renames_on_success_and_removes_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "a.txt"
    write_text_atomic(out, "one")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert out.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (out.stat().st_mode & 0o777) == 0o644


def test_atomic_dir_replaces_keeps_or_refuses(tmp_path: Path) -> None:
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("killed")
    assert (out / "x").read_text() == "1"  # the old complete directory survives a failure
    with atomic_dir(out) as tmp:
        (tmp / "y").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["y"]  # replaced as a whole
    with pytest.raises(OutputExistsError, match="already exists"), atomic_dir(out, overwrite=False):
        pytest.fail("must not be entered")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".d.abc123.tmp").mkdir()  # what a SIGKILLed atomic_dir leaves
    (tmp_path / ".a.txt.xyz.tmp").write_text("half")
    (tmp_path / ".scratch-split.q1.tmp").mkdir()
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("1")
    write_text_atomic(tmp_path / "a.txt", "done")
    with scratch_dir(tmp_path, "split") as work:
        assert work.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


def test_a_stage_run_beside_another_run_of_it_fails_at_once(tmp_path: Path) -> None:
    """`esm2-data ingest --config C` while another process runs ingest on the same build."""
    import subprocess
    import sys

    import yaml

    from pipeline.atomic import stage_lock
    from tests.helpers import REPO, SAMPLE_FASTA

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"build": "t", "out_dir": str(tmp_path / "out"),
                                      "inputs": [{"url": str(SAMPLE_FASTA)}]}))
    with stage_lock(tmp_path / "out", "ingest"):
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", "--config",
                                 str(config)], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 1
        assert "the ingest stage is already running on this build" in result.stderr
        assert not (tmp_path / "out" / "sequences.parquet").exists()
        with stage_lock(tmp_path / "out", "cluster"):  # another stage is not blocked
            pass
