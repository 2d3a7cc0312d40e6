"""Cluster-sampled MLM data: WebDataset shards of UniRef50 clusters → masked token batches.

ESM-2's scheme: every epoch visits each UniRef50 cluster of the split once, in a shuffled order;
for each, one UniRef90 member is drawn uniformly, cropped to ``max_residues`` at a random window,
wrapped as ``<cls> … <eos>`` and masked (15%: 80% ``<mask>``, 10% random residue, 10% unchanged;
special tokens never). Every random choice for a cluster comes from an RNG seeded by
(seed, epoch, cluster id), so what a cluster becomes does not depend on ranks, workers or order.

Shards are shuffled per epoch with the seed and dealt out to ranks, then to DataLoader workers;
each worker batches its own stream by token budget (length-sorted windows, padded or packed). The
stream's position (epoch, batches delivered by each worker, and the worker rotation) is a small
dict that restores the stream exactly mid-epoch. Shards are decoded through ``pipeline.shards``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import ClusterSample, iter_clusters, shard_paths
from training.alphabet import MASK, PAD, SPECIAL_IDS, STANDARD_AA_IDS, VOCAB_SIZE, encode

IGNORE_INDEX = -100
_SPECIAL = np.zeros(VOCAB_SIZE, dtype=bool)
_SPECIAL[sorted(SPECIAL_IDS)] = True
_RANDOM_RESIDUES = np.asarray(STANDARD_AA_IDS, dtype=np.int64)


@dataclass(frozen=True)
class DataConfig:
    """How clusters become batches."""

    seed: int = 0
    max_residues: int = 1022  # crop; +2 for <cls>/<eos>
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    tokens_per_batch: int = 16_384  # real + pad tokens (padded) or packed tokens per batch
    sort_window: int = 256  # examples sorted by length together before batching
    packed: bool = True


@dataclass(frozen=True)
class Example:
    """One masked training sequence."""

    cluster: str
    member: int
    input_ids: np.ndarray
    labels: np.ndarray


def cluster_rng(seed: int, epoch: int, cluster: str) -> np.random.Generator:
    """The RNG of one cluster in one epoch (independent of rank, worker and order)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{cluster}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def mask_tokens(
    ids: np.ndarray, rng: np.random.Generator, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """BERT/ESM masking of a token array; returns (input_ids, labels)."""
    candidates = ~_SPECIAL[ids]
    chosen = candidates & (rng.random(len(ids)) < cfg.mask_prob)
    labels = np.where(chosen, ids, IGNORE_INDEX)
    action = rng.random(len(ids))
    out = ids.copy()
    to_mask = chosen & (action < cfg.mask_token_frac)
    to_random = (
        chosen
        & (action >= cfg.mask_token_frac)
        & (action < cfg.mask_token_frac + cfg.random_token_frac)
    )
    out[to_mask] = MASK
    out[to_random] = rng.choice(_RANDOM_RESIDUES, size=int(to_random.sum()))
    return out, labels


def make_example(sample: ClusterSample, epoch: int, cfg: DataConfig) -> Example:
    """Pick a UniRef90 member uniformly, crop, add <cls>/<eos>, mask."""
    rng = cluster_rng(cfg.seed, epoch, sample.cluster)
    member = int(rng.integers(len(sample.sequences)))
    seq = sample.sequences[member]
    if len(seq) > cfg.max_residues:
        start = int(rng.integers(len(seq) - cfg.max_residues + 1))
        seq = seq[start : start + cfg.max_residues]
    ids = np.asarray(encode(seq), dtype=np.int64)
    input_ids, labels = mask_tokens(ids, rng, cfg)
    return Example(sample.cluster, member, input_ids, labels)


def collate(examples: Sequence[Example], packed: bool) -> dict[str, torch.Tensor]:
    """Padded ``[B, T]`` batch with ``attention_mask``, or one packed row with ``seq_ids``."""
    if packed:
        input_ids = np.concatenate([e.input_ids for e in examples])
        labels = np.concatenate([e.labels for e in examples])
        seq_ids = np.repeat(np.arange(len(examples)), [len(e.input_ids) for e in examples])
        return {
            "input_ids": torch.from_numpy(input_ids)[None],
            "labels": torch.from_numpy(labels)[None],
            "seq_ids": torch.from_numpy(seq_ids)[None],
        }
    width = max(len(e.input_ids) for e in examples)
    input_ids = np.full((len(examples), width), PAD, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=bool)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = e.input_ids
        labels[i, : len(e.labels)] = e.labels
        mask[i, : len(e.input_ids)] = True
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
    }


def batch_by_tokens(examples: Sequence[Example], cfg: DataConfig) -> list[list[Example]]:
    """Length-sorted greedy batches whose token count (padded or packed) fits the budget."""
    order = sorted(examples, key=lambda e: (len(e.input_ids), e.cluster))
    batches: list[list[Example]] = []
    current: list[Example] = []
    for e in order:
        n = len(e.input_ids)
        cost = (
            sum(len(x.input_ids) for x in current) + n
            if cfg.packed
            else max(n, *(len(x.input_ids) for x in current), 0) * (len(current) + 1)
        )
        if current and cost > cfg.tokens_per_batch:
            batches.append(current)
            current = []
        current.append(e)
    if current:
        batches.append(current)
    return batches


def shards_for(shards: Sequence[Path], seed: int, epoch: int, rank: int, world: int) -> list[Path]:
    """This rank's shards for an epoch: a seeded shuffle, dealt round-robin to ranks."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(shards))
    return [shards[i] for i in order[rank::world]]


class ClusterStream(IterableDataset):
    """Endless stream of batches over epochs for one rank; use with ``DataLoader(batch_size=None)``.

    Each yielded batch carries ``epoch``, ``worker`` and ``index`` (the worker's batch counter in
    that epoch) so the consumer can record its position (:class:`StreamPosition`).
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        cfg: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        position: dict | None = None,
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = [Path(s) for s in shards]
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.position = position or {}
        self.epochs = epochs

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def examples(self, epoch: int, stream: int, streams: int) -> Iterator[Example]:
        """The examples of one worker stream (``stream`` of ``streams``) in an epoch."""
        mine = shards_for(self.shards, self.cfg.seed, epoch, self.rank, self.world)[stream::streams]
        for sample in iter_clusters(mine):
            yield make_example(sample, epoch, self.cfg)

    def batches(self, epoch: int, stream: int, streams: int) -> Iterator[list[Example]]:
        window: list[Example] = []
        for example in self.examples(epoch, stream, streams):
            window.append(example)
            if len(window) == self.cfg.sort_window:
                yield from batch_by_tokens(window, self.cfg)
                window = []
        if window:
            yield from batch_by_tokens(window, self.cfg)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._worker()
        saved = self.position.get("workers")
        if saved is not None and saved != workers:
            raise ValueError(
                f"stream position was saved with {saved} loader workers, "
                f"resumed with {workers}: use the same num_workers to resume"
            )
        # after a resume, worker 0 continues the stream that was due next
        stream = (worker + self.position.get("rotation", 0)) % workers
        epoch, skip = self.position.get("streams", {}).get(str(stream), (0, 0))
        while self.epochs is None or epoch < self.epochs:
            for index, batch in enumerate(self.batches(epoch, stream, workers)):
                if index < skip:
                    continue
                out = collate(batch, self.cfg.packed)
                out.update(
                    epoch=epoch, stream=stream, index=index, clusters=[e.cluster for e in batch]
                )
                yield out
            epoch, skip = epoch + 1, 0


class StreamPosition:
    """Where each worker stream stands; ``state()`` resumes a ClusterStream exactly.

    Workers move through epochs independently, so the position is per stream:
    ``(epoch, next batch index)``, plus the rotation that makes the stream due next (the
    DataLoader hands out batches round-robin, in order) become worker 0 on resume.
    """

    def __init__(self, num_workers: int, state: dict | None = None) -> None:
        self.workers = max(num_workers, 1)
        state = state or {}
        self.streams = {int(k): tuple(v) for k, v in state.get("streams", {}).items()}
        self.rotation = state.get("rotation", 0)
        self.count = 0

    def update(self, batch: dict) -> None:
        self.streams[batch["stream"]] = (batch["epoch"], batch["index"] + 1)
        self.count += 1

    def state(self) -> dict:
        return {
            "workers": self.workers,
            "streams": {str(k): list(v) for k, v in sorted(self.streams.items())},
            "rotation": (self.rotation + self.count) % self.workers,
        }


def split_shards(build_dir: str | Path, split: str) -> list[Path]:
    """The shard files of one split of a build (``<build>/shards/<split>``)."""
    return shard_paths(Path(build_dir) / "shards" / split)


def make_loader(
    shards: Sequence[str | Path],
    cfg: DataConfig,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    position: dict | None = None,
    epochs: int | None = None,
) -> DataLoader:
    """A DataLoader over a ClusterStream (workers fork; batches are built inside workers)."""
    stream = ClusterStream(shards, cfg, rank, world_size, position, epochs)
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, persistent_workers=False, in_order=True
    )
