"""tqdm progress bars with the project's defaults (off when stderr is not a terminal)."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar; ``ESM2_PROGRESS=1`` forces it on, ``ESM2_PROGRESS=0`` off, else auto."""
    flag = os.environ.get("ESM2_PROGRESS")
    disable = None if flag is None else flag == "0"
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(disable=disable, **kwargs)


def byte_bar(total: int | None, desc: str, initial: int = 0) -> tqdm:
    """A progress bar counting bytes."""
    return progress_bar(
        total=total, desc=desc, initial=initial, unit="B", unit_scale=True, unit_divisor=1024
    )
