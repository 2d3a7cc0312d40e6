"""Progress of long work: tqdm bars on a terminal, log lines otherwise (a Snakemake rule's log).

``ESM2_PROGRESS=1`` forces tqdm bars, ``ESM2_PROGRESS=0`` turns progress off; otherwise a bar is
drawn when stderr is a terminal, and elsewhere a log line is written every
``ESM2_PROGRESS_INTERVAL`` seconds (default 60) and when the work ends.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded where a bar is drawn (tqdm.auto: ~0.02 s to import)
    from tqdm.auto import tqdm

log = logging.getLogger("pipeline.progress")
_DEFAULT_INTERVAL_S = 60.0


class LogProgress:
    """The part of tqdm's interface the stages use, reported as log lines at an interval
    (``silent``: never)."""

    def __init__(self, desc: str = "", total: float | None = None, unit: str = "it",
                 unit_scale: bool = False, initial: float = 0, interval: float | None = None,
                 silent: bool = False, **_: Any) -> None:
        self.desc, self.total, self.unit, self.unit_scale = desc, total, unit, unit_scale
        self.n = initial
        self.postfix = ""
        self.interval = interval if interval is not None else float(
            os.environ.get("ESM2_PROGRESS_INTERVAL", _DEFAULT_INTERVAL_S))
        self.start = self.last = time.monotonic()
        self.closed = silent

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.closed and time.monotonic() - self.last >= self.interval:
            self._emit()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text
        if not self.closed and time.monotonic() - self.last >= self.interval:
            self._emit()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit(done=True)

    def _amount(self, value: float) -> str:
        if not self.unit_scale:
            return f"{value:,.0f}"
        return format_sizeof(value, divisor=1024 if self.unit == "B" else 1000)

    def _emit(self, done: bool = False) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        unit = "" if self.unit == "it" else f" {self.unit.strip()}"
        text = f"{self.desc}: {'done' if done else 'at'} {self._amount(self.n)}"
        if self.total:
            text += f"/{self._amount(self.total)}{unit} ({self.n / self.total:.0%})"
        else:
            text += unit
        if elapsed >= 1 and self.n / elapsed >= 1:
            text += f", {self._amount(self.n / elapsed)}{unit}/s"
        text += f" in {elapsed:.0f} s"
        if self.postfix:
            text += f" [{self.postfix}]"
        log.info("%s", text)


def format_sizeof(value: float, divisor: int = 1000) -> str:
    """``value`` with an SI prefix (k, M, G, ...), as tqdm writes it."""
    from tqdm.auto import tqdm

    return tqdm.format_sizeof(value, divisor=divisor)


def progress_bar(**kwargs: Any) -> tqdm | LogProgress:
    """A tqdm bar on a terminal, a :class:`LogProgress` elsewhere, a silent one with progress
    off (see the module docstring)."""
    flag = os.environ.get("ESM2_PROGRESS")
    if flag == "0":
        return LogProgress(silent=True, **kwargs)
    if flag == "1" or sys.stderr.isatty():
        from tqdm.auto import tqdm

        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("mininterval", 0.5)
        return tqdm(**kwargs)
    return LogProgress(**kwargs)


def byte_bar(total: int | None, desc: str, initial: int = 0) -> tqdm | LogProgress:
    """A progress bar counting bytes."""
    return progress_bar(
        total=total, desc=desc, initial=initial, unit="B", unit_scale=True, unit_divisor=1024
    )
