"""Shared by the benchmark scripts: run a command as a child, report wall time and peak RSS."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def run_measured(cmd: list[str], stdout: int | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, the kernel's maxrss) of a child process; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, env={**os.environ, "ESM2_PROGRESS": "0"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


def mmseqs_seconds(log: Path) -> float:
    """Total wall time of the MMseqs2 commands a stage ran (from its log's timing lines)."""
    from pipeline.mmseqs import ELAPSED_MARK

    if not log.exists():
        return 0.0
    return sum(float(line.split(" after ")[1].split()[0])
               for line in log.read_text().splitlines() if line.startswith(ELAPSED_MARK))


def generated_fasta(work: Path, n_sequences: int) -> Path:
    """``work/families-N.fasta.gz`` of N generated family sequences (seed 0), made once."""
    work.mkdir(parents=True, exist_ok=True)
    fasta = work / f"families-{n_sequences}.fasta.gz"
    if not fasta.exists():
        from pipeline.generate import write_families

        write_families(fasta, n_sequences, seed=0)
    return fasta
