"""One owner of a build directory's layout: every path a stage reads or writes, and the check
that a stage's inputs are there.

Stages, the Snakefile, the manifest and the trainer ask a :class:`BuildDir` for paths rather than
spelling file names; names relative to the build root (for a build served over HTTP) are the
class constants and :meth:`BuildDir.split_rel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.errors import PipelineError

SPLITS = ("train", "valid", "test")  # the splits of a build, in this order
# clusters kept out of every split (pinned out, or decontaminated): no shard holds them
EXCLUDED = "excluded"


@dataclass(frozen=True)
class BuildDir:
    """The paths of the build rooted at ``root`` (a config's ``out_dir``)."""

    root: Path

    # names relative to the root (a build served over HTTP is read by these)
    RAW = "raw"
    DOWNLOAD_RECORD = "raw/download.json"
    SEQUENCES = "sequences.parquet"
    RECORDS = "records.parquet"
    CLUSTERS = "clusters.parquet"
    CLUSTER_LINKS = "cluster_links.parquet"
    SPLIT_TABLE = "splits.parquet"
    SHARDS = "shards"
    VALIDATION = "validation"
    STATS = "stats"
    LOGS = "logs"
    RESOLVED_CONFIG = "build_config.yaml"
    STAGE_CONFIGS = "config"
    INGEST_PARTS = "ingest_parts"
    EVALUATION_SETS = "raw/evaluation_sets"  # decontaminate's fetched sets (inputs, not outputs)
    DECONTAMINATION = "decontamination.parquet"
    DECONTAMINATION_STATS = "stats/decontamination.json"

    # what makes each file: named in the error when a stage's input is missing
    MADE_BY: ClassVar[dict[str, str]] = {
        DOWNLOAD_RECORD: "download", SEQUENCES: "ingest", RECORDS: "ingest",
        CLUSTERS: "cluster", CLUSTER_LINKS: "cluster", SPLIT_TABLE: "split",
        "stats/leakage.json": "check-leakage", SHARDS: "shards", VALIDATION: "validation",
        DECONTAMINATION: "decontaminate", DECONTAMINATION_STATS: "decontaminate",
    }
    # outputs only a build with ``decontaminate:`` sets has
    OPTIONAL: ClassVar[tuple[str, ...]] = (DECONTAMINATION, DECONTAMINATION_STATS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str or PathLike too

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def raw(self) -> Path:
        return self.root / self.RAW

    @property
    def download_record(self) -> Path:
        return self.root / self.DOWNLOAD_RECORD

    @property
    def sequences(self) -> Path:
        return self.root / self.SEQUENCES

    @property
    def records(self) -> Path:
        return self.root / self.RECORDS

    @property
    def clusters(self) -> Path:
        return self.root / self.CLUSTERS

    @property
    def cluster_links(self) -> Path:
        return self.root / self.CLUSTER_LINKS

    @property
    def splits(self) -> Path:
        return self.root / self.SPLIT_TABLE

    @property
    def shards(self) -> Path:
        return self.root / self.SHARDS

    @staticmethod
    def split_rel(split: str) -> str:
        """A split's shard directory, relative to the build root."""
        return f"{BuildDir.SHARDS}/{split}"

    def split_shards(self, split: str) -> Path:
        return self.root / self.split_rel(split)

    @property
    def validation(self) -> Path:
        return self.root / self.VALIDATION

    def stats(self, stage: str) -> Path:
        """``stats/<stage>.json``."""
        return self.root / self.STATS / f"{stage}.json"

    def log(self, name: str) -> Path:
        """``logs/<name>.log`` (e.g. ``cluster.mmseqs``)."""
        return self.root / self.LOGS / f"{name}.log"

    def lock(self, stage: str) -> Path:
        """The lock a running stage holds on the build (``logs/.<stage>.lock``)."""
        return self.root / self.LOGS / f".{stage}.lock"

    @property
    def resolved_config(self) -> Path:
        return self.root / self.RESOLVED_CONFIG

    def stage_config(self, stage: str) -> Path:
        """The part of the config a stage's outputs depend on (``config/<stage>.yaml``)."""
        return self.root / self.STAGE_CONFIGS / f"{stage}.yaml"

    def ingest_part(self, index: int | str) -> Path:
        """Where ``esm2-data ingest --part index`` leaves input ``index``'s partitions."""
        return self.root / self.INGEST_PARTS / str(index)

    @property
    def evaluation_sets(self) -> Path:
        return self.root / self.EVALUATION_SETS

    @property
    def decontamination(self) -> Path:
        """The train clusters the decontaminate stage moved out, with the hit that moved them."""
        return self.root / self.DECONTAMINATION

    def outputs(self, decontaminated: bool = False) -> list[Path]:
        """Every file or directory a finished build has (the manifest describes them all);
        ``decontaminated``: the build has ``decontaminate:`` sets."""
        return [self.root / name for name in self.MADE_BY
                if decontaminated or name not in self.OPTIONAL]

    def require(self, *paths: Path) -> None:
        """Raise a one-line error naming the first missing input and the stage that makes it."""
        for path in paths:
            if not path.exists():
                rel = path.relative_to(self.root).as_posix() if path.is_relative_to(
                    self.root) else path.name
                stage = self.MADE_BY.get(rel)
                hint = f" (run 'esm2-data {stage}' first)" if stage else ""
                raise PipelineError(f"{path}: missing{hint}")
