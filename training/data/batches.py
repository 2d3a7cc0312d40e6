"""Cluster-sampled MLM data: split samples → masked token batches for one rank.

ESM-2's scheme: every epoch visits each UniRef50 cluster of the split once, in an order that is a
function of (seed, epoch) alone (:mod:`training.data.sampler`); for each, one UniRef90 member is
drawn uniformly, cropped to ``max_residues`` at a random window, wrapped as ``<cls> … <eos>`` and
masked (15%: 80% ``<mask>``, 10% random residue, 10% unchanged; special tokens never). Every random
choice for a cluster is seeded by (seed, epoch, cluster), so what a cluster becomes does not depend
on ranks, workers or order.

Samples, not shards, are dealt: each global batch is split into this rank's micro-batches
(:func:`training.data.sampler.assign`), which DataLoader workers read by index from the tar shards
(``pipeline.shards.ShardReader``, WebDataset's ``wids``) and collate, packed or padded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import PipelineError
from pipeline.ids import cluster_hash
from pipeline.settings import Section
from pipeline.shard_reader import ShardReader, SplitIndex
from pipeline.shards import ClusterSample
from training.alphabet import (
    CLS,
    EOS,
    IGNORE_INDEX,
    MASK,
    PAD,
    SPECIAL_IDS,
    STANDARD_AA_IDS,
    VOCAB_SIZE,
    encode,
)
from training.data.sampler import (
    GlobalBatch,
    Position,
    assign,
    global_batches,
    greedy_batches,
    member_draws,
)
from training.model.config import MAX_RESIDUES
from training.model.layout import pack_token_lists

_SPECIAL = np.zeros(VOCAB_SIZE, dtype=bool)
_SPECIAL[sorted(SPECIAL_IDS)] = True
_RANDOM_RESIDUES = np.asarray(STANDARD_AA_IDS, dtype=np.int64)


EVAL_SEED = 12345  # the validation set's fixed masking (the same for every run and report)


class DataConfig(Section):
    """How clusters become batches (a training config's ``data:`` section)."""

    seed: int = 0
    max_residues: int = Field(MAX_RESIDUES, gt=0)  # crop; +2 for <cls>/<eos>
    mask_prob: float = Field(0.15, gt=0, lt=1)
    mask_token_frac: float = Field(0.8, ge=0, le=1)
    random_token_frac: float = Field(0.1, ge=0, le=1)
    # real + pad tokens (padded) or packed tokens per micro-batch and rank
    tokens_per_batch: int = Field(16_384, gt=0)
    sort_window: int = Field(256, gt=0)  # examples sorted by length together (validation)
    packed: bool = True
    shuffle_chunk: int = Field(4096, gt=0)  # consecutive clusters shuffled together (locality)
    num_workers: int = Field(0, ge=0)  # DataLoader workers per rank

    @model_validator(mode="after")
    def _budget_holds_a_sequence(self) -> DataConfig:
        if self.tokens_per_batch < self.max_residues + 2:
            raise ValueError(f"tokens_per_batch ({self.tokens_per_batch}) must hold one cropped "
                             f"sequence: at least max_residues + 2 = {self.max_residues + 2}")
        if self.mask_token_frac + self.random_token_frac > 1:
            raise ValueError("mask_token_frac + random_token_frac must be at most 1")
        return self


@dataclass(frozen=True)
class Example:
    """One masked training sequence."""

    cluster: str
    member: int
    input_ids: np.ndarray
    labels: np.ndarray


def cluster_rng(seed: int, epoch: int, key_hash: int) -> np.random.Generator:
    """The crop and masking RNG of one cluster in one epoch (``key_hash``: its
    :func:`~pipeline.ids.cluster_hash`); independent of rank, worker and order."""
    return np.random.default_rng([seed, epoch, key_hash])


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


def make_example(sample: ClusterSample, epoch: int, cfg: DataConfig,
                 key_hash: int | None = None) -> Example:
    """Pick a UniRef90 member uniformly, crop, add <cls>/<eos>, mask."""
    key_hash = cluster_hash(sample.cluster) if key_hash is None else key_hash
    draw = member_draws(cfg.seed, epoch, np.asarray([key_hash], dtype=np.uint64))[0]
    member = int(draw % np.uint64(len(sample.sequences)))
    rng = cluster_rng(cfg.seed, epoch, key_hash)
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
        input_ids, seq_ids = pack_token_lists([e.input_ids for e in examples])  # one row
        labels = np.concatenate([e.labels for e in examples])
        return {"input_ids": input_ids, "labels": torch.from_numpy(labels)[None],
                "seq_ids": seq_ids}
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
    cuts = greedy_batches([len(e.input_ids) for e in order], cfg.tokens_per_batch, cfg.packed)
    return [[order[i] for i in batch] for batch in cuts]


def empty_batch(packed: bool) -> dict[str, torch.Tensor]:
    """A micro-batch with nothing to learn (``<cls><eos>``, no label): a rank whose share of a
    global batch is smaller than its micro-step count still runs the step's collectives."""
    ids = np.asarray([CLS, EOS], dtype=np.int64)
    return collate([Example("", 0, ids, np.full(2, IGNORE_INDEX, dtype=np.int64))], packed)


@dataclass(frozen=True)
class MicroBatch:
    """A unit of loader work: one micro-batch of one rank's share of a global batch."""

    epoch: int
    batch: int  # global batch number in the epoch
    micro: int  # this rank's micro-batch number in the global batch
    micros: int  # micro-batches per rank in this global batch
    indices: tuple[int, ...]  # split sample indices
    end: dict  # Position after the global batch (as a dict)


def rank_work(index: SplitIndex, cfg: DataConfig, tokens_per_step: int, rank: int, world: int,
              start: Position | None = None, epochs: int | None = None) -> Iterator[MicroBatch]:
    """This rank's micro-batches, global batch after global batch."""
    for gb in global_batches(index, cfg.seed, cfg.max_residues, tokens_per_step,
                             cfg.shuffle_chunk, start, epochs):
        yield from _share(gb, cfg, rank, world)


def _share(gb: GlobalBatch, cfg: DataConfig, rank: int, world: int) -> Iterator[MicroBatch]:
    shares = assign(gb.lengths.tolist(), world, cfg.tokens_per_batch, cfg.packed)[rank]
    for micro, positions in enumerate(shares):
        yield MicroBatch(gb.epoch, gb.batch, micro, len(shares),
                         tuple(int(gb.indices[p]) for p in positions), gb.end.to_dict())


class _Work:
    """The sampler of the DataLoader: yields this rank's micro-batches (a fresh plan per iter)."""

    def __init__(self, make: Callable[[], Iterator[MicroBatch]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[MicroBatch]:
        return self.make()


class ClusterBatches(Dataset):
    """Map-style dataset: a :class:`MicroBatch` → its collated batch (built in a worker).

    Read errors come back as ``{"error": message}`` (one line naming the shard and sample), so the
    trainer can stop with that line rather than a worker traceback.
    """

    def __init__(self, split_dir: Path, cfg: DataConfig,
                 local_shard: Callable[[str], Path] | None = None) -> None:
        self.split_dir, self.cfg, self.local_shard = Path(split_dir), cfg, local_shard
        self._reader: ShardReader | None = None

    def __len__(self) -> int:  # pragma: no cover - indexed by MicroBatch only
        raise TypeError("ClusterBatches is indexed by MicroBatch items")

    def reader(self) -> ShardReader:
        if self._reader is None:  # opened in the worker process that uses it
            self._reader = ShardReader(SplitIndex(self.split_dir), self.local_shard)
        return self._reader

    def __getitem__(self, item: MicroBatch) -> dict:
        try:
            reader = self.reader()
            examples = [make_example(reader.read(i), item.epoch, self.cfg,
                                     int(reader.index.keys[i])) for i in item.indices]
        except PipelineError as exc:
            return {"error": " ".join(str(exc).split())}
        out = collate(examples, self.cfg.packed) if examples else empty_batch(self.cfg.packed)
        out.update(epoch=item.epoch, batch=item.batch, micro=item.micro, micros=item.micros,
                   end=item.end, clusters=[e.cluster for e in examples])
        return out


def make_loader(
    split_dir: str | Path,
    cfg: DataConfig,
    tokens_per_step: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    start: Position | dict | None = None,
    epochs: int | None = None,
    local_shard: Callable[[str], Path] | None = None,
) -> DataLoader:
    """A DataLoader of this rank's micro-batches from ``start`` on (``tokens_per_step``: the
    global batch's token budget, default ``cfg.tokens_per_batch``)."""
    start = start if isinstance(start, Position) else Position.from_dict(start)
    index = SplitIndex(split_dir)
    budget = tokens_per_step or cfg.tokens_per_batch
    work = _Work(lambda: rank_work(index, cfg, budget, rank, world_size, start, epochs))
    return DataLoader(ClusterBatches(Path(split_dir), cfg, local_shard), sampler=work,
                      batch_size=None, num_workers=num_workers, in_order=True,
                      persistent_workers=False, multiprocessing_context="fork"
                      if num_workers else None)
