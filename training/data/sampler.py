"""World-size-free sample order: epochs, global batches and each rank's share of them.

* **Epoch order** (:class:`EpochOrder`) is a function of (seed, epoch, number of clusters) alone:
  a chunked shuffle of the split's sample indices (chunks of ``shuffle_chunk`` consecutive
  samples, rotated by a per-epoch offset, in a shuffled order, each shuffled inside), so a global
  batch reads from a few shards at a time while every epoch is a different permutation.
* **Global batches** (:func:`global_batches`) take clusters in epoch order until their examples
  (one drawn UniRef90 member, cropped, plus ``<cls>``/``<eos>``) reach ``tokens_per_step``; the
  last batch of an epoch takes what is left. Example lengths come from the split's arrays
  (``member_lengths.npy``), so no shard is read to plan. Global batch k is the same set of
  clusters for any world size and any number of loader workers.
* **Shares** (:func:`assign`): the batch's examples go to ``world × m`` micro-batches of at most
  ``tokens_per_batch`` tokens (longest first, each to the least-loaded micro-batch; ``m`` is the
  smallest count that fits), ``m`` per rank: ranks get equal token loads and the same number of
  micro-steps. A micro-batch may be empty when a batch has fewer clusters than micro-batches.

A :class:`Position` (epoch, global batches consumed in it, clusters consumed in it) is all a
checkpoint needs to continue the same sequence on any world size.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.shard_reader import SplitIndex

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def member_draws(seed: int, epoch: int, key_hashes: np.ndarray) -> np.ndarray:
    """A uniform 64-bit draw per cluster, seeded by (seed, epoch, cluster); the UniRef90 member
    of a cluster with n members is ``draw % n``."""
    salt = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + 0x5EED) & _MASK64
    with np.errstate(over="ignore"):
        return _splitmix64(np.asarray(key_hashes, dtype=np.uint64) ^ np.uint64(salt))


def example_lengths(index: SplitIndex, indices: np.ndarray, seed: int, epoch: int,
                    max_residues: int) -> np.ndarray:
    """Tokens of each sample's example in an epoch (drawn member, cropped, + cls/eos)."""
    counts = index.member_counts(indices)
    members = (member_draws(seed, epoch, index.keys[indices]) % counts.astype(np.uint64))
    residues = index.lengths[index.offsets[indices] + members.astype(np.int64)]
    return np.minimum(residues, max_residues).astype(np.int64) + 2


class EpochOrder:
    """The order of an epoch's samples: a chunked shuffle determined by (seed, epoch, n)."""

    def __init__(self, n: int, seed: int, epoch: int, chunk: int) -> None:
        self.n, self.seed, self.epoch, self.chunk = n, seed, epoch, chunk
        rng = np.random.default_rng([seed, epoch, 0x0DE7])
        self.rotation = int(rng.integers(n)) if n else 0
        chunks = math.ceil(n / chunk)
        self.chunk_order = rng.permutation(chunks)
        sizes = np.minimum(chunk, n - self.chunk_order * chunk)
        self.slot_starts = np.concatenate([[0], np.cumsum(sizes)])

    def chunk_at(self, slot: int) -> np.ndarray:
        """The sample indices of the ``slot``-th chunk of the epoch, in order."""
        c = int(self.chunk_order[slot])
        size = int(self.slot_starts[slot + 1] - self.slot_starts[slot])
        inner = np.random.default_rng([self.seed, self.epoch, 0xC4, c]).permutation(size)
        return (self.rotation + c * self.chunk + inner) % self.n

    def from_offset(self, offset: int) -> Iterator[np.ndarray]:
        """The epoch's sample indices from position ``offset`` on, a chunk at a time."""
        slot = int(np.searchsorted(self.slot_starts, offset, side="right")) - 1
        skip = offset - int(self.slot_starts[slot]) if offset < self.n else 0
        for s in range(max(slot, 0), len(self.chunk_order)):
            yield self.chunk_at(s)[skip:]
            skip = 0

    def full(self) -> np.ndarray:
        return np.concatenate(list(self.from_offset(0))) if self.n else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Position:
    """Where a run stands in the global sample sequence (independent of ranks and workers)."""

    epoch: int = 0
    batch: int = 0  # global batches consumed in this epoch
    offset: int = 0  # clusters consumed in this epoch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Position:
        return cls(**data) if data else cls()


@dataclass(frozen=True)
class GlobalBatch:
    """One optimiser step's clusters: split sample indices and their example lengths."""

    epoch: int
    batch: int
    indices: np.ndarray
    lengths: np.ndarray
    end: Position  # the position after this batch


def global_batches(index: SplitIndex, seed: int, max_residues: int, tokens_per_step: int,
                   shuffle_chunk: int, start: Position | None = None,
                   epochs: int | None = None) -> Iterator[GlobalBatch]:
    """The global batches from ``start`` on (endless unless ``epochs`` is given)."""
    n = len(index)
    if n == 0:
        return
    start = start or Position()
    epoch, batch, offset = start.epoch, start.batch, start.offset
    while epochs is None or epoch < epochs:
        order = EpochOrder(n, seed, epoch, shuffle_chunk)
        picked: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        tokens = count = 0
        for chunk in order.from_offset(offset):
            lengths = example_lengths(index, chunk, seed, epoch, max_residues)
            begin = 0
            for i, length in enumerate(lengths.tolist()):
                if count and tokens + length > tokens_per_step:
                    picked.append(chunk[begin:i])
                    sizes.append(lengths[begin:i])
                    offset += count
                    yield GlobalBatch(epoch, batch, np.concatenate(picked), np.concatenate(sizes),
                                      Position(epoch, batch + 1, offset))
                    batch += 1
                    picked, sizes, tokens, count, begin = [], [], 0, 0, i
                tokens += length
                count += 1
            picked.append(chunk[begin:])
            sizes.append(lengths[begin:])
        if count:
            offset += count
            yield GlobalBatch(epoch, batch, np.concatenate(picked), np.concatenate(sizes),
                              Position(epoch + 1, 0, 0))
        epoch, batch, offset = epoch + 1, 0, 0


def greedy_batches(lengths: Sequence[int], budget: int, packed: bool) -> list[list[int]]:
    """Positions of ``lengths``, in the given order, cut into consecutive batches whose tokens
    stay within ``budget``: the sum (packed) or rows × longest (padded); an example over the
    budget gets a batch of its own. (Validation and embedding batches: the training deal is
    :func:`assign`.)"""
    batches: list[list[int]] = []
    current: list[int] = []
    total = longest = 0
    for i, n in enumerate(lengths):
        cost = total + n if packed else max(longest, n) * (len(current) + 1)
        if current and cost > budget:
            batches.append(current)
            current, total, longest = [], 0, 0
        current.append(i)
        total, longest = total + n, max(longest, n)
    if current:
        batches.append(current)
    return batches


def assign(lengths: Sequence[int], world: int, tokens_per_batch: int,
           packed: bool) -> list[list[list[int]]]:
    """Deal a global batch's examples (by position) to ``world`` ranks × ``m`` micro-batches.

    Longest first, each to the micro-batch with the least tokens; ``m`` is the smallest count for
    which every micro-batch fits ``tokens_per_batch``. Returns ``shares[rank][micro]`` = sorted
    positions into ``lengths``. Deterministic in (lengths, world, budget, packed).
    """
    if lengths and max(lengths) > tokens_per_batch:
        raise ValueError(f"an example of {max(lengths)} tokens exceeds tokens_per_batch "
                         f"{tokens_per_batch}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    m = max(1, math.ceil(sum(lengths) / (world * tokens_per_batch)))
    while True:
        bins = _fill(order, lengths, world * m, tokens_per_batch, packed)
        if bins is not None:
            return [[sorted(b) for b in bins[r * m:(r + 1) * m]] for r in range(world)]
        m += 1


def _fill(order: list[int], lengths: Sequence[int], n_bins: int, budget: int,
          packed: bool) -> list[list[int]] | None:
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    heap = [(0, b) for b in range(n_bins)]
    for i in order:
        cost, b = heapq.heappop(heap)
        # padded: examples come longest first, so a micro-batch's first example is its widest
        new = cost + lengths[i] if packed else (lengths[bins[b][0]] if bins[b] else lengths[i]) * (
            len(bins[b]) + 1)
        if new > budget:
            return None
        bins[b].append(i)
        heapq.heappush(heap, (new, b))
    return bins
