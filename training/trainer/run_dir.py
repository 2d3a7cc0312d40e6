"""The layout of a training run directory, owned here (trainer, consolidate, evaluate, export):

```
<run>/metrics.jsonl            one JSON line per optimiser step (rank 0)
<run>/checkpoints/config.json  the run's training config and model config
<run>/checkpoints/stepNNNNNNNN DeepSpeed's ZeRO partitions, rng.pt, and our meta.json, written last
<run>/checkpoints/latest       the tag of the newest *complete* checkpoint (written after meta.json)
<run>/final/                   the gathered weights (our checkpoint format)
<run>/evaluation.json          `esm2-train evaluate` on the run (Snakemake's train target)
<run>/tensorboard/             DeepSpeed's monitor, when enabled
```
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import write_text_atomic
from training.errors import UserError

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
FINAL = "final"
RNG_STATE = "rng.pt"
META = "meta.json"  # inside a step directory: written last, so its presence means complete
_CONTENTS = (METRICS, CHECKPOINTS, FINAL, "evaluation.json", "tensorboard")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory, and the rules for its checkpoints."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def config(self) -> Path:
        return self.checkpoints / "config.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def step_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    def rng_state(self, tag: str) -> Path:
        """The CPU random state saved with a checkpoint (restored on resume)."""
        return self.step_dir(tag) / RNG_STATE

    def is_complete(self, tag: str) -> bool:
        return (self.step_dir(tag) / META).is_file()

    def meta(self, tag: str) -> dict:
        return json.loads((self.step_dir(tag) / META).read_text())

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag, or None."""
        path = self.checkpoints / "latest"
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        return tag if self.is_complete(tag) else None

    def complete_tags(self) -> list[str]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.glob("step*") if self.is_complete(p.name))

    def mark_complete(self, tag: str, meta: dict) -> None:
        """Write the step's meta.json, then point ``latest`` at it (both atomically)."""
        write_text_atomic(self.step_dir(tag) / META, json.dumps(meta, indent=2) + "\n")
        write_text_atomic(self.checkpoints / "latest", tag + "\n")

    def prune(self, keep_last: int, current: str) -> None:
        """Keep the newest ``keep_last`` complete checkpoints up to ``current``; remove the rest
        (and any incomplete step directory that is not ``current``)."""
        keep = {t for t in self.complete_tags() if t <= current}
        keep = set(sorted(keep)[-keep_last:]) | {current}
        for path in self.checkpoints.glob("step*"):
            if path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def in_use(self) -> list[str]:
        """What of a run this directory already holds (empty: a fresh directory)."""
        return [name for name in _CONTENTS if (self.root / name).exists()]

    def resume_tag(self, resume: str, overwrite: bool) -> str | None:
        """The checkpoint a run starts from, or None for a fresh start, by the resume mode:
        ``no`` (the directory must not hold a run unless ``overwrite``), ``yes`` (a complete
        checkpoint must exist) or ``auto`` (resume if there is one). Raises what is wrong."""
        tag = self.latest()
        if resume == "yes" and tag is None:
            raise UserError(f"{self.root}: no complete checkpoint to resume from (drop --resume "
                            "to start a new run, or use --resume-or-start)")
        if resume != "no" and tag is not None:
            return tag
        used = self.in_use()
        if used and not overwrite and resume != "auto":
            raise UserError(f"{self.root}: already holds a training run ({', '.join(used)}); "
                            "--resume continues it, --overwrite replaces it")
        return None

    def clear(self) -> None:
        """Remove a previous run's files (``--overwrite``); other files are left alone."""
        for name in _CONTENTS:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    @classmethod
    def locate(cls, path: str | os.PathLike[str]) -> tuple[RunDir, str] | None:
        """(run, tag) for a run dir, its ``checkpoints/`` or one ``stepNNNNNNNN`` dir; None when
        ``path`` is none of these."""
        p = Path(path)
        if (p / CHECKPOINTS).is_dir():
            run = cls(p)
        elif p.name == CHECKPOINTS:
            run = cls(p.parent)
        elif p.name.startswith("step") and p.parent.name == CHECKPOINTS:
            return cls(p.parent.parent), p.name
        else:
            return None
        tag = run.latest()
        return (run, tag) if tag else None
