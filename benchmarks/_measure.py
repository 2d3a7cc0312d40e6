"""Shared by the benchmark scripts: run a command as a child, report wall time and peak RSS."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path


def run_measured(cmd: list[str], stdout: int | None = None,
                 env: dict[str, str] | None = None,
                 outputs: tuple[Path, ...] = (),
                 warm: tuple[Path, ...] = ()) -> tuple[float, float]:
    """Wall seconds and peak memory (MiB) of a child process (``env``: added to this
    process's environment), started with no dirty pages of earlier runs; exits on failure.

    ``outputs`` (files or directories) are removed first, so that every run writes new files
    as the first did: on ext4 a file renamed over another, or an existing one truncated to
    zero, is written out at once by the kernel, in the timed process (0.13 s seen for 200 MB).

    ``warm`` files (the inputs) are read just before the clock starts, so that every run reads
    them from a warm page cache: on this VM a cached file left alone for 2 s or more reads
    slower again (124 MB: 0.04 s right after a read, 0.31-0.39 s after 2-8 s idle), and how
    long a variant's input had been idle depended on the variant run before it.

    The peak is the larger of the kernel's maxrss (the largest single process) and the largest
    sum of RSS over the child and all its descendants, sampled every 20 ms (worker processes
    count together)."""
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    os.sync()  # the writes of the runs before are not written back under this one
    for path in warm:
        _read_through(path)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout,
                            env={**os.environ, "ESM2_PROGRESS": "0", **(env or {})})
    tree_peak = [0]
    done = threading.Event()
    sampler = threading.Thread(target=_sample_tree_rss, args=(proc.pid, done, tree_peak))
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, max(usage.ru_maxrss * 1024, tree_peak[0]) / 2**20


def _read_through(path: Path) -> None:
    """Read ``path`` to its end (into the page cache), in 8 MiB blocks."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(8 << 20):
            pass


def _sample_tree_rss(pid: int, done: threading.Event, peak: list[int]) -> None:
    """Keep ``peak[0]`` at the largest summed RSS (bytes) of ``pid`` and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not done.wait(0.1):  # /proc walks cost CPU: sampling faster slows the child
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.Error:  # a process ended while sampled
            continue
        peak[0] = max(peak[0], total)


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
