"""Arrow's allocator: the pipeline package picks jemalloc unless the user chose one."""

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
