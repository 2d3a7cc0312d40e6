"""The loader this project had before sample-level dealing, kept as the benchmark's baseline.

Whole shards are shuffled per epoch and dealt to ranks, then to DataLoader workers; each worker
batches its own stream by token budget. (Replaced in training/data/batches.py: a rank or
worker without a shard starved, and resume needed the same world size and worker count.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shard_reader import iter_clusters
from training.data.batches import DataConfig, Example, batch_by_tokens, collate, make_example


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


def make_old_loader(
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
