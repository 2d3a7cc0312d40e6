"""Keeping a long stage's resident memory near its live data.

Two allocators hold on to memory a stage has freed: Arrow's mimalloc pool keeps freed pages of
each thread's heap, and glibc keeps each thread's malloc arena (numpy arrays, bytes). Measured
on the ingest benchmark, these added ~150-250 MiB to the resident peak. Importing ``pipeline``
makes jemalloc Arrow's process-wide pool on Linux (``pipeline/__init__.py``: it has to be chosen
before pyarrow loads), set to keep freed pages for the next buffers (the peak stays that of the
live data: what is kept is reused); where pyarrow was loaded first, :func:`arrow_jemalloc`
switches pyarrow's own allocations to it for a block (Arrow's C++ parts keep the process
default). :func:`trim_heap` gives the free memory of glibc, and of a pool that can release it
(mimalloc, the system allocator), back at a phase end (~100 MiB at the end of the ingest parse).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator
from functools import cache

import pyarrow as pa


@contextlib.contextmanager
def arrow_jemalloc() -> Iterator[None]:
    """Arrow allocates from its jemalloc pool inside the block (where pyarrow has one)."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc: keep the default
        yield
        return
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Return the free memory of glibc's heap and of Arrow's default pool (where it releases
    any: not jemalloc as configured here) to the OS at a phase end."""
    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
