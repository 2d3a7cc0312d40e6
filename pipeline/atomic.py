"""Atomic outputs: write under a temporary name in the destination directory, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import OutputExistsError, PipelineError


def remove_stale(parent: Path, name: str) -> None:
    """Remove temporaries (``.NAME.*.tmp``) left next to ``NAME`` by a killed earlier run.

    A stage holds its lock (:func:`stage_lock`) while it runs, so a temporary of the same
    output found at start can only be a leftover.
    """
    for stale in parent.glob(f".{name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def temp_sibling(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path``, on failure delete it."""
    final = Path(path)
    tmp = temp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path``.

    An existing ``path`` is moved aside before the rename and removed after it, so ``path`` is
    always either the old or the new complete directory. With ``overwrite=False`` an existing
    ``path`` is an :class:`OutputExistsError` before anything is written.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise OutputExistsError(f"{final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700; outputs are meant to be shared
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", suffix=".tmp",
                                        dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    """A temporary working directory under ``parent``, always removed afterwards."""
    base = Path(parent)
    base.mkdir(parents=True, exist_ok=True)
    name = f"scratch-{prefix}"  # distinct from atomic_dir's temporaries of an output "prefix"
    remove_stale(base, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=base))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def stage_lock(out_dir: str | os.PathLike[str], stage: str) -> Iterator[None]:
    """Hold ``<out_dir>/logs/.<stage>.lock`` while a stage runs: a second writer of the same
    outputs (a stage run by hand beside Snakemake) fails at once instead of interleaving."""
    import fcntl

    from pipeline.build_dir import BuildDir

    path = BuildDir(out_dir).lock(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"{out_dir}: the {stage} stage is already running on this build (another "
                f"process holds {path}); wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
