"""WebDataset shards, one sample per UniRef50 cluster: the schema and the writer (readers:
:mod:`pipeline.shard_reader`, which decodes through this module).

Shard contract (see DESIGN.md), owned here:

* ``<out>/shards/<split>/<split>-%06d.tar`` plus ``<out>/shards/<split>/index.json`` listing each
  shard's sample, UniRef90-member and residue counts and sha256.
* Beside them, three NumPy arrays over the split's samples in shard order (sample ``i`` of the
  split is sample ``i - start`` of the shard that holds it), so a reader can plan batches and
  seek samples without reading the shards: ``keys.npy`` (uint64
  :func:`~pipeline.ids.cluster_hash` of each cluster id), ``member_offsets.npy`` (int64,
  samples + 1) and ``member_lengths.npy`` (int32, the residues of every UniRef90 member,
  aligned with each sample's ``members``).
* One sample per UniRef50 cluster. ``__key__`` is the cluster id (``.`` and ``%`` are
  percent-encoded, since WebDataset splits keys at dots); the one field, ``cluster.json``, holds
  ``cluster`` (the UniRef50 id), ``uniprot_entries`` (UniProt records in the cluster),
  ``uniref90_count``, and the aligned lists ``members`` (UniRef90 ids; the representative's own
  UniRef90 first, then by id), ``member_entries`` (records per UniRef90 cluster) and
  ``sequences`` (each UniRef90 representative's sequence).
* Deterministic bytes: clusters ordered by a seeded hash, shard boundaries by size, tar headers
  fixed (mtime 0, uid/gid 0, user/group ``esm2``, mode 0444, USTAR).

Grouping never holds the dataset in memory: UniRef90 rows are partitioned on disk by the hash of
their representative (to join sequences), then by the seeded cluster-order hash (to group and
order clusters), and each partition is processed on its own.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import webdataset as wds

from pipeline.atomic import atomic_dir, scratch_dir, write_text_atomic
from pipeline.build_dir import EXCLUDED, SPLITS, BuildDir
from pipeline.checksums import sha256_file
from pipeline.config import BuildConfig, ShardsConfig
from pipeline.errors import PipelineError
from pipeline.ids import ENTRIES, accession_of, cluster_hash, entries_sum, order_key
from pipeline.partition import BucketWriter, read_partition
from pipeline.progress import format_sizeof, progress_bar
from pipeline.split import final_splits

FIELD = "cluster.json"
INDEX = "index.json"
SCHEMA_VERSION = 2  # 2: keys.npy, member_offsets.npy and member_lengths.npy beside the tars
ARRAYS = {"keys": ("keys.npy", np.uint64), "member_offsets": ("member_offsets.npy", np.int64),
          "member_lengths": ("member_lengths.npy", np.int32)}
_BATCH = 65_536


@dataclass(frozen=True)
class ClusterSample:
    """One UniRef50 cluster as stored in a shard."""

    cluster: str
    uniprot_entries: int
    members: list[str]
    member_entries: list[int]
    sequences: list[str]

    @property
    def uniref90_count(self) -> int:
        return len(self.members)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "cluster": self.cluster,
                "uniprot_entries": self.uniprot_entries,
                "uniref90_count": self.uniref90_count,
                "members": self.members,
                "member_entries": self.member_entries,
                "sequences": self.sequences,
            },
            separators=(",", ":"),
        ).encode()


def encode_key(cluster_id: str) -> str:
    """WebDataset-safe ``__key__`` for a cluster id."""
    return quote(cluster_id, safe="").replace(".", "%2E")


def decode_key(key: str) -> str:
    return unquote(key)


def decode_sample(sample: dict) -> ClusterSample:
    """A WebDataset sample dict (raw bytes fields) → :class:`ClusterSample`."""
    try:
        raw = sample[FIELD]
    except KeyError:
        raise PipelineError(
            f"{sample.get('__url__', '?')}: sample {sample.get('__key__')!r} has no {FIELD}"
        ) from None
    obj = json.loads(raw)
    return ClusterSample(
        obj["cluster"], obj["uniprot_entries"], obj["members"], obj["member_entries"],
        obj["sequences"],
    )


def read_index(split_dir: str | Path) -> dict:
    """The index of one split's shards (``shards/<split>/index.json``)."""
    path = Path(split_dir) / INDEX
    if not path.is_file():
        raise PipelineError(f"{path}: no shard index (run 'esm2-data shards' first)")
    return json.loads(path.read_text())


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of a split (``<split>-%06d.tar``)."""
    return f"{split}-{index:06d}.tar"


def shard_paths(split_dir: str | Path) -> list[Path]:
    """The shard files of a split, in index order."""
    index = read_index(split_dir)
    return [Path(split_dir) / s["file"] for s in index["shards"]]


class ShardWriter:
    """Writes samples of one split into size-bounded, byte-reproducible tar shards."""

    def __init__(self, directory: Path, split: str, max_bytes: int) -> None:
        self.dir, self.split, self.max_bytes = directory, split, max_bytes
        self.bytes_written = 0  # tar bytes of every sample so far (progress)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._buf: io.BytesIO | None = None
        self._tar: wds.TarWriter | None = None
        self._size = 0
        self._arrays = {name: _ArrayWriter(self.dir / file, dtype)
                        for name, (file, dtype) in ARRAYS.items()}
        self._arrays["member_offsets"].append([0])
        self._members = 0

    def _open(self) -> None:
        self._buf = io.BytesIO()
        self._tar = wds.TarWriter(self._buf, user="esm2", group="esm2", mode=0o444, mtime=0,
                                  encoder=False)
        self.shards.append({"samples": 0, "uniref90_members": 0, "uniprot_entries": 0,
                            "residues": 0})
        self._size = 0

    def write(self, sample: ClusterSample) -> None:
        payload = sample.to_json()
        entry = 512 + math.ceil(len(payload) / 512) * 512
        if self._tar is not None and self._size + entry > self.max_bytes and self._size:
            self._close()
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": encode_key(sample.cluster), FIELD: payload})
        self._size += entry
        self.bytes_written += entry
        meta = self.shards[-1]
        meta["samples"] += 1
        meta["uniref90_members"] += sample.uniref90_count
        meta["uniprot_entries"] += sample.uniprot_entries
        meta["residues"] += sum(len(s) for s in sample.sequences)
        self._members += sample.uniref90_count
        self._arrays["keys"].append([cluster_hash(sample.cluster)])
        self._arrays["member_offsets"].append([self._members])
        self._arrays["member_lengths"].append([len(s) for s in sample.sequences])

    def _close(self) -> None:
        self._tar.close()
        name = shard_name(self.split, len(self.shards) - 1)
        path = self.dir / name
        path.write_bytes(self._buf.getvalue())
        self.shards[-1] = {"file": name, **self.shards[-1], "bytes": path.stat().st_size,
                           "sha256": sha256_file(path)}
        self._tar = self._buf = None

    def finish(self) -> dict:
        if self._tar is not None:
            self._close()
        totals = {k: sum(s[k] for s in self.shards) for k in
                  ("samples", "uniref90_members", "uniprot_entries", "residues", "bytes")}
        arrays = {name: writer.finish() for name, writer in self._arrays.items()}
        index = {"schema_version": SCHEMA_VERSION, "split": self.split, "field": FIELD,
                 "shards": self.shards, "arrays": arrays,
                 "totals": {**totals, "shards": len(self.shards)}}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return index


class _ArrayWriter:
    """A 1-d ``.npy`` file appended to in chunks (memory bounded by the chunk, not the split)."""

    _CHUNK = 1 << 20

    def __init__(self, path: Path, dtype: type) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self._raw = path.with_name(path.name + ".raw")
        self._fh = open(self._raw, "wb")  # noqa: SIM115 (closed in finish)
        self._pending: list[int] = []
        self.count = 0

    def append(self, values: Iterable[int]) -> None:
        self._pending.extend(values)
        if len(self._pending) >= self._CHUNK:
            self._flush()

    def _flush(self) -> None:
        self._fh.write(np.asarray(self._pending, dtype=self.dtype).tobytes())
        self.count += len(self._pending)
        self._pending = []

    def finish(self) -> str:
        """Write ``path`` (a standard .npy file) and return its name."""
        self._flush()
        self._fh.close()
        out = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype,
                                        shape=(self.count,))
        with open(self._raw, "rb") as fh:
            for start in range(0, self.count, self._CHUNK):
                chunk = np.frombuffer(fh.read(self._CHUNK * self.dtype.itemsize), self.dtype)
                out[start : start + len(chunk)] = chunk
        out.flush()
        del out
        self._raw.unlink()
        return self.path.name


def _uniref90_rows(out: BuildDir, tmp: Path, n_buckets: int) -> list[Path | None]:
    """Partition (rep90, rep50, entries) rows and rep90 sequences by representative hash."""
    by_acc = pl.col("acc").hash(seed=7) % n_buckets
    carry: pl.DataFrame | None = None
    with BucketWriter(tmp, "rows", n_buckets) as rows, BucketWriter(tmp, "seqs", n_buckets) as seqs:
        clusters = pq.ParquetFile(out.clusters)
        columns = ["rep90", "rep50"]
        if ENTRIES in clusters.schema_arrow.names:
            columns.append(ENTRIES)
        for batch in clusters.iter_batches(_BATCH, columns=columns):
            df = pl.from_arrow(batch)
            if carry is not None:
                df = pl.concat([carry, df])
            # clusters.parquet is sorted by rep50, rep90: hold back the last (maybe partial) group
            last = df.get_column("rep90")[-1]
            carry, df = df.filter(pl.col("rep90") == last), df.filter(pl.col("rep90") != last)
            rows.write(_count(df), by_acc)
        if carry is not None:
            rows.write(_count(carry), by_acc)
        for batch in pq.ParquetFile(out.sequences).iter_batches(
            _BATCH, columns=["accession", "sequence"]
        ):
            seqs.write(pl.from_arrow(batch).rename({"accession": "acc"}), by_acc)
    row_paths, seq_paths = rows.close(), seqs.close()
    return [r for pair in zip(row_paths, seq_paths, strict=True) for r in pair]


def _count(df: pl.DataFrame) -> pl.DataFrame:
    return df.group_by("rep90", maintain_order=True).agg(
        pl.col("rep50").first(), entries_sum(df.columns).alias("entries")
    ).with_columns(accession_of(90, pl.col("rep90")).alias("acc"))


def _joined_members(
    parts: list[Path | None], splits: pl.DataFrame, seed: int, tmp: Path, n_buckets: int
) -> list[Path | None]:
    """Join each rep90 with its sequence and split; re-partition by cluster order."""
    by_order = pl.col("key").str.slice(0, 6).str.to_integer(base=16) * n_buckets // (1 << 24)
    with BucketWriter(tmp, "ordered", n_buckets) as ordered:
        for rows_path, seqs_path in zip(parts[::2], parts[1::2], strict=True):
            if rows_path is not None:
                ordered.write(_join_partition(rows_path, seqs_path, splits, seed), by_order)
    return ordered.close()


def _join_partition(
    rows_path: Path, seqs_path: Path | None, splits: pl.DataFrame, seed: int
) -> pl.DataFrame:
    """One partition's rep90 rows with their sequence, split and cluster order key."""
    rows = read_partition(rows_path)
    seqs = read_partition(seqs_path) if seqs_path else pl.DataFrame(
        schema={"acc": pl.String, "sequence": pl.String})
    joined = rows.join(seqs, on="acc", how="left").join(splits, on="rep50", how="left")
    if joined.get_column("sequence").null_count() or joined.get_column("split").null_count():
        raise PipelineError("clusters.parquet, splits.parquet and sequences.parquet disagree "
                            "(rerun cluster and split)")
    joined = joined.with_columns(
        pl.col("rep50").map_elements(lambda c: order_key(seed, c), return_dtype=pl.String)
        .alias("key")
    )
    return joined.select("key", "rep50", "rep90", "entries", "sequence", "split")


def _samples(part: pl.DataFrame) -> Iterator[tuple[str, ClusterSample]]:
    part = part.with_columns(
        (accession_of(90, pl.col("rep90")) != accession_of(50, pl.col("rep50"))).alias("_not_rep")
    ).sort(["key", "rep50", "_not_rep", "rep90"])
    grouped = part.group_by(["key", "rep50"], maintain_order=True).agg(
        pl.col("split").first(), pl.col("rep90"), pl.col("entries"), pl.col("sequence")
    )
    for _, rep50, split, members, entries, seqs in grouped.iter_rows():
        yield split, ClusterSample(rep50, int(sum(entries)), members, entries, seqs)


def write_shards(out_dir: str | Path, cfg: ShardsConfig, seed: int,
                 decontaminated: bool = False) -> dict:
    """Write ``<out>/shards/`` (all splits) from clusters, splits and sequences; clusters
    pinned or decontaminated out of every split (``excluded``) are in no shard."""
    out = BuildDir(out_dir)
    out.require(out.sequences, out.clusters, out.splits)
    n_buckets = max(1, math.ceil(out.sequences.stat().st_size * 3
                                 / cfg.bucket_bytes))
    splits = final_splits(out, decontaminated)
    total = splits.filter(pl.col("split") != EXCLUDED).height
    with scratch_dir(out, "shards") as tmp, atomic_dir(out.shards) as dest:
        parts = _uniref90_rows(out, tmp, n_buckets)
        ordered = _joined_members(parts, splits, seed, tmp, n_buckets)
        writers = {s: ShardWriter(dest / s, s, cfg.max_shard_bytes) for s in SPLITS}
        with progress_bar(total=total, desc="shards", unit=" clusters") as bar:
            for path in ordered:
                if path is None:
                    continue
                for split, sample in _samples(read_partition(path)):
                    if split == EXCLUDED:
                        continue
                    writers[split].write(sample)
                    bar.update(1)
                written = sum(w.bytes_written for w in writers.values())
                bar.set_postfix_str(f"{format_sizeof(written, divisor=1024)}B of tar")
        indexes = {s: w.finish() for s, w in writers.items()}
    written = sum(i["totals"]["samples"] for i in indexes.values())
    if written != total:
        raise PipelineError(f"wrote {written} cluster samples for {total} UniRef50 clusters")
    summary = {s: i["totals"] for s, i in indexes.items()}
    write_text_atomic(out.stats("shards"), json.dumps(summary, indent=2) + "\n")
    return summary


def run(cfg: BuildConfig) -> dict:
    """The shards stage of a build."""
    out = cfg.out
    if not cfg.decontaminate:  # sets removed from the config: their outputs describe nothing
        out.decontamination.unlink(missing_ok=True)
        out.stats("decontamination").unlink(missing_ok=True)
    return write_shards(cfg.out_dir, cfg.shards, cfg.seed, bool(cfg.decontaminate))
