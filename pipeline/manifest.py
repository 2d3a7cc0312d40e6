"""Build manifests: what went in, which tools ran, what came out (with sha256), and checks."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.atomic import write_text_atomic
from pipeline.build_dir import EXCLUDED
from pipeline.checksums import sha256_file
from pipeline.config import BuildConfig, config_to_dict, parse_config
from pipeline.errors import PipelineError
from pipeline.mmseqs import find_mmseqs, mmseqs_version

SCHEMA_VERSION = 1
STAGE_STATS = ("ingest", "cluster", "split", "leakage", "shards", "validation")
# Every output a build leaves, relative to out_dir (globs for the shard sets).
OUTPUT_PATTERNS = (
    "sequences.parquet", "records.parquet", "clusters.parquet", "cluster_links.parquet",
    "splits.parquet", "decontamination.parquet",
    "shards/*/index.json", "shards/*/*.tar", "shards/*/*.npy", "validation/*", "stats/*.json",
)
_REPO = Path(__file__).resolve().parents[1]


def git_state() -> dict[str, str | bool | None]:
    """Commit of the code that ran, and whether the work tree had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True,
                                text=True, check=True, timeout=30).stdout.strip()
        # manifests themselves don't count: rewriting one must not mark the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!data_manifests"],
                               cwd=_REPO, capture_output=True, text=True, check=True,
                               timeout=30).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def tool_versions(cfg: BuildConfig) -> dict:
    versions: dict[str, object] = {
        "python": platform.python_version(),
        "esm2-pretrain": __version__,
        "git": git_state(),
        "mmseqs": mmseqs_version(find_mmseqs(cfg.cluster.mmseqs)),
    }
    for dist in ("polars", "pyarrow", "webdataset", "numpy", "isal", "snakemake"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _records(path: Path) -> int | None:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".tar":
        index = json.loads((path.parent / "index.json").read_text())
        by_file = {s["file"]: s["samples"] for s in index["shards"]}
        return by_file.get(path.name)
    if path.suffix == ".fasta":
        with open(path, "rb") as fh:
            return sum(block.count(b">") for block in iter(lambda: fh.read(1 << 20), b""))
    return None


def list_outputs(out: Path) -> list[dict]:
    """Every output file of a build with its size, sha256 and record count."""
    files = sorted({p for pattern in OUTPUT_PATTERNS for p in out.glob(pattern)
                    if p.is_file() and not p.name.startswith(".")})  # no .snakemake_timestamp
    return [
        {"path": p.relative_to(out).as_posix(), "bytes": p.stat().st_size,
         "sha256": sha256_file(p), "records": _records(p)}
        for p in files
    ]


def build_manifest(cfg: BuildConfig) -> dict:
    out = cfg.out
    stages = STAGE_STATS + (("decontamination",) if cfg.decontaminate else ())
    out.require(out.download_record, *(out.stats(stage) for stage in stages))
    fetched = json.loads(out.download_record.read_text())
    counts = {stage: json.loads(out.stats(stage).read_text()) for stage in stages}
    return {
        "schema_version": SCHEMA_VERSION,
        "build": cfg.build,
        "config": config_to_dict(cfg),
        "release": fetched["release"],
        "inputs": [{k: v for k, v in item.items() if k != "verified_with"}
                   for item in fetched["inputs"]],
        "release_files": fetched["release_files"],
        "tools": tool_versions(cfg),
        "counts": counts,
        "outputs": list_outputs(out.root),
    }


def manifest_path(cfg: BuildConfig) -> Path:
    return Path(cfg.manifest_dir) / f"{cfg.build}.json"


def write_manifest(cfg: BuildConfig, dest: Path | None = None) -> Path:
    """Write the manifest (default ``<manifest_dir>/<build>.json``) atomically."""
    path = dest or manifest_path(cfg)
    text = json.dumps(build_manifest(cfg), indent=2, sort_keys=True) + "\n"
    write_text_atomic(path, text)
    return path


def load_manifest(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{p}: no such manifest") from None
    except json.JSONDecodeError as err:
        raise PipelineError(f"{p}: not a valid manifest (JSON error: {err})") from None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise PipelineError(f"{p}: unsupported manifest schema {data.get('schema_version')!r}")
    return data


def manifest_config(manifest: dict, source: str) -> BuildConfig:
    return parse_config(manifest["config"], source)


def compare_outputs(expected: list[dict], out: Path, prefix: str = "") -> list[str]:
    """Differences between a manifest's outputs (under ``prefix``) and the files in ``out``."""
    problems = []
    wanted = [e for e in expected if e["path"].startswith(prefix)]
    known = {e["path"] for e in expected}
    for entry in wanted:
        path = out / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: size {path.stat().st_size} != {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest")
    for path in [] if prefix else _build_files(out):
        if path not in known:
            problems.append(f"{path}: not in the manifest")
    return problems


# What a build directory holds besides its outputs: inputs and bookkeeping, never hashed.
_BOOKKEEPING = ("raw/", "logs/", "config/", "build_config.yaml")


def _build_files(out: Path) -> list[str]:
    """Every file under ``out`` that should be an output (anywhere, not just the output
    patterns: an extra file at the top is reported too); bookkeeping and dotfiles left out."""
    files = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not path.name.startswith(".") and not rel.startswith(_BOOKKEEPING):
            files.append(rel)
    return files


def verify(manifest_file: str | Path, out_dir: str | Path | None = None) -> list[str]:
    """Re-hash a build against its manifest; returns the list of differences."""
    manifest = load_manifest(manifest_file)
    out = Path(out_dir) if out_dir else Path(manifest["config"]["out_dir"])
    if not out.is_dir():
        raise PipelineError(f"{out}: build directory not found")
    return compare_outputs(manifest["outputs"], out)


def summary(manifest: dict) -> str:
    """A readable summary of a manifest."""
    c = manifest["counts"]
    tools = manifest["tools"]
    lines = [
        f"build {manifest['build']}  (release {manifest['release'].get('name')}, "
        f"{manifest['release'].get('date') or 'no date'})",
        f"code  esm2-pretrain {tools['esm2-pretrain']} @ {tools['git'].get('commit')}"
        f"{' (dirty)' if tools['git'].get('dirty') else ''}; mmseqs {tools['mmseqs']}; "
        f"polars {tools['polars']}; pyarrow {tools['pyarrow']}",
        "inputs:",
        *[f"  {i['path']}  {i['size']:,} bytes  sha256 {i['sha256'][:16]}…"
          for i in manifest["inputs"]],
        f"ingest: {c['ingest']['records_read']:,} records read, "
        f"{c['ingest']['records_rejected']:,} rejected, "
        f"{c['ingest']['unique_sequences']:,} distinct sequences",
        f"cluster: {c['cluster']['uniref90']['clusters']:,} UniRef90, "
        f"{c['cluster']['uniref50']['clusters']:,} UniRef50 clusters "
        f"(largest UniRef50: {c['cluster']['uniref50']['max']:,} records)",
        "splits:",
    ]
    pinned_out = {EXCLUDED: c["split"][EXCLUDED]} if EXCLUDED in c["split"] else {}
    for name, row in {**c["split"]["splits"], **pinned_out}.items():
        lines.append(
            f"  {name:<6} {row['uniref50_clusters']:>10,} UniRef50 {row['uniref90_clusters']:>10,}"
            f" UniRef90 {row['sequences']:>11,} seqs {row['residues']:>14,} residues"
        )
    leak = c["leakage"]
    lines.append(
        f"leakage: {leak['fraction_at_or_above_threshold']:.2%} of {leak['queries']:,} held-out "
        f"sequences have a train hit >= {leak['identity_threshold']:.0%} identity"
    )
    decontamination = c.get("decontamination")
    if decontamination:
        for name, row in decontamination["sets"].items():
            lines.append(
                f"decontaminate {name}: {row['sequences_with_hit']:,} of {row['sequences']:,} "
                f"sequences hit train at >= {row['identity']:.0%} identity; "
                f"{row['excluded']['uniref50_clusters']:,} UniRef50 clusters "
                f"({row['excluded']['sequences']:,} records) left train")
        total = decontamination["excluded"]
        lines.append(f"decontaminated: {total['groups']:,} split groups, "
                     f"{total['uniref50_clusters']:,} UniRef50 clusters, "
                     f"{total['sequences']:,} records excluded from train")
    for name, row in c["shards"].items():
        lines.append(f"shards {name:<6} {row['shards']:>5} files {row['samples']:>10,} samples "
                     f"{row['bytes']:>14,} bytes")
    lines.append(f"validation: {c['validation']['sequences']:,} sequences "
                 f"({c['validation']['residues']:,} residues)")
    lines.append(f"outputs: {len(manifest['outputs'])} files, "
                 f"{sum(o['bytes'] for o in manifest['outputs']):,} bytes")
    return "\n".join(lines)
