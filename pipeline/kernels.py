"""The compiled ingest kernels (``pipeline/_scan.c``, built by ``setup.py``) where the install
built them, else None; each caller keeps a numpy twin that defines the same result.

``ESM2_NUMPY_KERNELS=1`` turns them off (for comparisons; outputs are the same either way).
Callers read :data:`SCAN` at call time, so tests can swap it.
"""

from __future__ import annotations

import os
from types import ModuleType

SCAN: ModuleType | None
try:
    from pipeline import _scan as SCAN
except ImportError:  # built without a C compiler
    SCAN = None
if os.environ.get("ESM2_NUMPY_KERNELS", "") not in ("", "0"):
    SCAN = None
