"""Reading a split's shards: the per-sample arrays (:class:`SplitIndex`), random access to a
sample by index (:class:`ShardReader`, WebDataset's ``wids``), and a plain sequential read
(:func:`iter_clusters`). Samples decode through :mod:`pipeline.shards`, which owns the format.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.errors import PipelineError
from pipeline.ids import cluster_hash
from pipeline.shards import (
    ARRAYS,
    FIELD,
    INDEX,
    ClusterSample,
    decode_key,
    decode_sample,
    read_index,
)


def iter_clusters(shards: Iterable[str | Path]) -> Iterator[ClusterSample]:
    """Read clusters from the given shard files, in order, all of them.

    The caller decides which shards to read (training deals shards to ranks and workers
    itself), so WebDataset's own node and worker splitting is switched off.
    """
    urls = [str(s) for s in shards]
    if not urls:
        return
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None,
                             workersplitter=None)
    for sample in dataset:
        yield decode_sample(sample)


class SplitIndex:
    """One split's shard list and per-sample arrays (memory-mapped): sample ``i`` of the split
    is found with :meth:`locate` without reading any shard."""

    def __init__(self, split_dir: str | Path) -> None:
        self.dir = Path(split_dir)
        index = read_index(self.dir)
        if index.get("schema_version", 1) < 2 or "arrays" not in index:
            raise PipelineError(f"{self.dir / INDEX}: shards from an older version (no per-sample "
                                "arrays): rerun 'esm2-data shards' on the build")
        self.shards: list[dict] = index["shards"]
        counts = np.asarray([s["samples"] for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        arrays = {}
        for name, (_, dtype) in ARRAYS.items():
            path = self.dir / index["arrays"][name]
            try:
                arrays[name] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise PipelineError(f"{path}: cannot read the {name} array ({exc})") from None
            if arrays[name].dtype != dtype:
                raise PipelineError(f"{path}: dtype {arrays[name].dtype}, not {np.dtype(dtype)}")
        self.keys, self.offsets, self.lengths = (
            arrays["keys"], arrays["member_offsets"], arrays["member_lengths"])
        n = int(self.starts[-1])
        if (len(self.keys), len(self.offsets), len(self.lengths)) != (n, n + 1, self.offsets[-1]):
            raise PipelineError(f"{self.dir}: index.json and the per-sample arrays disagree "
                                "(rerun 'esm2-data shards')")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def member_counts(self, indices: np.ndarray) -> np.ndarray:
        return self.offsets[indices + 1] - self.offsets[indices]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, sample number inside that shard) of split sample ``index``."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])


class ShardReader:
    """Random access to a split's samples by index (WebDataset's ``wids`` indexed tar reader).

    ``local_shard(name)`` gives the local path of a shard file (a remote build's cache fetches it
    there); the last ``open_shards`` shards stay open. Every sample's key is checked against
    ``keys.npy``; a damaged shard is a :class:`PipelineError` naming the shard and the sample.
    """

    def __init__(self, index: SplitIndex, local_shard: Callable[[str], Path] | None = None,
                 open_shards: int = 16) -> None:
        self.index = index
        self.local_shard = local_shard or (lambda name: index.dir / name)
        self.open_shards = open_shards
        self._open: OrderedDict[int, object] = OrderedDict()

    def _shard(self, number: int):
        from wids.wids import IndexedTarSamples

        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        meta = self.index.shards[number]
        path = self.local_shard(meta["file"])
        try:
            tar = IndexedTarSamples(path=str(path))
        except FileNotFoundError:
            raise PipelineError(f"{path}: shard missing") from None
        except Exception as exc:  # wids raises plain errors on a damaged tar
            raise PipelineError(f"{path}: not a readable tar shard ({type(exc).__name__}: "
                                f"{exc})") from None
        if len(tar) != meta["samples"]:
            tar.close()
            raise PipelineError(f"{path}: {len(tar)} samples, index.json says {meta['samples']} "
                                "(damaged shard)")
        self._open[number] = tar
        while len(self._open) > self.open_shards:
            self._open.popitem(last=False)[1].close()
        return tar

    def read(self, index: int) -> ClusterSample:
        """Split sample ``index`` as a :class:`ClusterSample`."""
        number, inner = self.index.locate(index)
        tar = self._shard(number)
        where = tar.path  # the shard's local path, named by every error below
        try:
            raw = tar[inner]
            key = decode_key(raw["__key__"])
            sample = decode_sample({"__key__": key, FIELD: raw["." + FIELD].read()})
        except PipelineError:
            raise
        except Exception as exc:  # a damaged member: bad UTF-8, JSON, fields
            key = locals().get("key", f"#{inner}")
            raise PipelineError(f"{where}: sample {key}: damaged ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:200]})") from None
        if sample.cluster != key or cluster_hash(key) != int(self.index.keys[index]):
            raise PipelineError(f"{where}: sample {key}: not the sample keys.npy expects at "
                                f"split index {index} (damaged shard or stale arrays)")
        return sample

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
