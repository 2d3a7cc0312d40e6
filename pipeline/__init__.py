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
# Arrow's jemalloc hands freed pages back to the kernel (over 1 s; buffers of 8 MiB and more
# at once), and the next buffer faults them in again, each page zeroed: the ingest's final
# phase built every ~40 MB row group in fresh pages. Kept for reuse until the process ends
# (Arrow offers no call that would purge them earlier), the ingest faulted ~80k fewer pages and
# its final phase took 1.43 s, not 1.47 s; the peak is the same, as what is kept is reused. The
# variable is that jemalloc's own MALLOC_CONF (its symbols carry Arrow's prefix); a value the
# user set wins.
if sys.platform.startswith("linux"):
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:0")

__version__ = "0.1.0"
