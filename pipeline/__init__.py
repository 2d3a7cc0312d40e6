"""Dataset build for esm2-pretrain: UniProt download, ingest, clustering, splits, shards."""

import os
import sys

# Arrow's C++ parts (IPC reader, Parquet writer, compute kernels) allocate from the process's
# default pool, chosen once, when pyarrow loads, from this variable. Its default, mimalloc,
# hands freed pages back after 10 ms and the next chunk's buffers fault them in again, each
# 4 KiB page zeroed by the kernel: measured on the ingest benchmark, jemalloc (which reuses
# freed extents) made the parse 25% faster, the final phase 10%, and the peak 30 MiB lower.
# A value set by the user wins; with pyarrow loaded before this package it has no effect. Linux
# only: pyarrow's wheels for other systems may lack jemalloc (Arrow would warn and fall back).
#
# Arrow's jemalloc hands a freed page back to the kernel over its decay time (Arrow's: 1 s),
# and the next buffer faults it in again, zeroed: the ingest's final phase allocated ~350 MB of
# fresh row-group buffers a second that way (88k page faults, 0.09 s of 1.5 s). With 30 s,
# pages freed are reused while a stage runs and still go back half a minute after it frees
# them (at once at a phase end: pipeline.memory.trim_heap). The variable is that jemalloc's own
# MALLOC_CONF (its symbols carry Arrow's prefix); a value the user set wins.
if sys.platform.startswith("linux"):
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:30000,muzzy_decay_ms:30000")

__version__ = "0.1.0"
