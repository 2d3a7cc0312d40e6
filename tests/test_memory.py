"""Arrow's allocator: the pipeline package picks jemalloc, and its decay time, unless the user
chose them."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

PROBE = "import pipeline, pyarrow as pa; print(pa.default_memory_pool().backend_name)"


def _backend(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if env_value is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def _has_jemalloc() -> bool:
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        return False
    return True


@pytest.mark.skipif(not _has_jemalloc() or not sys.platform.startswith("linux"),
                    reason="jemalloc is made Arrow's pool on Linux, where pyarrow has it")
def test_importing_pipeline_makes_jemalloc_arrows_default_pool():
    assert _backend(None) == "jemalloc"


def test_a_pool_the_user_chose_wins():
    assert _backend("system") == "system"


# Touches a 64 MiB Arrow buffer, frees it, waits 2.5 s (longer than Arrow's own decay time),
# and touches another; prints the page faults of the second (pages reused: none; handed back
# and faulted in again: 16384).
REUSE = """
import resource, time
import pipeline
import numpy as np, pyarrow as pa
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def touch():
    buffer = pa.allocate_buffer(64 << 20)
    np.frombuffer(buffer, np.uint8)[:] = 1
touch()
time.sleep(2.5)
before = faults()
touch()
print(faults() - before)
"""


@pytest.mark.skipif(not _has_jemalloc() or not sys.platform.startswith("linux"),
                    reason="jemalloc is made Arrow's pool on Linux, where pyarrow has it")
def test_freed_arrow_pages_are_reused_unless_the_user_set_the_decay():
    env = {k: v for k, v in os.environ.items() if k != "JE_ARROW_MALLOC_CONF"}
    arrows_own = {"JE_ARROW_MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:1000"}
    runs = [subprocess.Popen([sys.executable, "-c", REUSE], env={**env, **extra},
                             stdout=subprocess.PIPE, text=True) for extra in ({}, arrows_own)]
    kept, arrows = (int(run.communicate()[0]) for run in runs)
    assert kept < 256  # the second buffer lives in the first one's pages
    assert arrows > 8192  # the user's choice (here Arrow's own 1 s) wins: faulted in again
