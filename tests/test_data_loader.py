from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import chisquare

from pipeline.shards import ClusterSample, ShardWriter
from training.alphabet import CLS, EOS, MASK
from training.data import (
    IGNORE_INDEX,
    DataConfig,
    StreamPosition,
    make_example,
    make_loader,
    split_shards,
)

AA = np.array(list("LAGVSERTIDPKQNFYMHWC"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """60 clusters of 1-5 members (some longer than the crop) in several shards."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("shards")
    writer = ShardWriter(root / "train", "train", max_bytes=40_000)
    for i in range(60):
        n = int(rng.integers(1, 6))
        seqs = ["".join(rng.choice(AA, size=int(rng.integers(30, 1500)))) for _ in range(n)]
        writer.write(ClusterSample(f"UniRef50_C{i:03d}", n, [f"UniRef90_C{i:03d}_{j}"
                                   for j in range(n)], [1] * n, seqs))
    index = writer.finish()
    assert index["totals"]["shards"] >= 6
    return [root / "train" / s["file"] for s in index["shards"]]


def collect(loader, limit: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def test_masking_statistics() -> None:
    cfg = DataConfig(seed=1)
    rng_seq = "".join(np.random.default_rng(1).choice(AA, size=1000))
    chosen = masked = random = kept = total = 0
    for i in range(200):
        ex = make_example(ClusterSample(f"c{i}", 1, ["m"], [1], [rng_seq]), 0, cfg)
        original = np.asarray([CLS, *[0] * 1000, EOS])  # only specials' positions matter here
        sel = ex.labels != IGNORE_INDEX
        assert not sel[0] and not sel[-1]  # <cls>/<eos> never masked
        assert ex.input_ids[0] == CLS and ex.input_ids[-1] == EOS
        chosen += sel.sum()
        total += len(ex.labels) - 2
        masked += (ex.input_ids[sel] == MASK).sum()
        same = ex.input_ids[sel] == ex.labels[sel]
        kept += same.sum()
        random += (~same & (ex.input_ids[sel] != MASK)).sum()
        del original
    assert abs(chosen / total - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.01
    # a random replacement can hit the original residue (1 in 20): "unchanged" gets ~0.1 + 0.005
    assert abs(random / chosen - 0.1 * 19 / 20) < 0.01
    assert abs(kept / chosen - (0.1 + 0.1 / 20)) < 0.01


def test_crop_and_budget(shards) -> None:
    cfg = DataConfig(seed=0, tokens_per_batch=4096, packed=False)
    for batch in collect(make_loader(shards, cfg, epochs=1)):
        ids = batch["input_ids"]
        assert ids.shape[1] <= 1024 and ids.numel() <= 4096
        assert (ids[:, 0] == CLS).all()
    packed = DataConfig(seed=0, tokens_per_batch=4096, packed=True)
    for batch in collect(make_loader(shards, packed, epochs=1)):
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 4096
        assert batch["seq_ids"].max().item() + 1 == len(batch["clusters"])


def test_epoch_visits_every_cluster_once_across_ranks_and_workers(shards) -> None:
    cfg = DataConfig(seed=3, tokens_per_batch=3000)
    seen = []
    for rank in range(2):
        loader = make_loader(shards, cfg, rank=rank, world_size=2, num_workers=2, epochs=1)
        seen += [c for batch in collect(loader) for c in batch["clusters"]]
    assert len(seen) == 60 and len(set(seen)) == 60


def test_members_are_drawn_uniformly(shards) -> None:
    from pipeline.shards import iter_clusters

    sample = next(s for s in iter_clusters(shards) if s.uniref90_count == 4)
    cfg = DataConfig(seed=5)
    counts = Counter(make_example(sample, epoch, cfg).member for epoch in range(4000))
    assert sorted(counts) == [0, 1, 2, 3]
    assert chisquare(list(counts.values())).pvalue > 0.001


def test_same_seed_same_samples_for_any_worker_count(shards) -> None:
    cfg = DataConfig(seed=9, tokens_per_batch=3000)

    def per_cluster(workers: int) -> dict:
        out = {}
        for batch in collect(make_loader(shards, cfg, num_workers=workers, epochs=2)):
            seq = batch["seq_ids"][0]
            for i, cluster in enumerate(batch["clusters"]):
                key = (batch["epoch"], cluster)
                out[key] = (batch["input_ids"][0][seq == i].tolist(),
                            batch["labels"][0][seq == i].tolist())
        return out

    zero, two = per_cluster(0), per_cluster(2)
    assert len(zero) == 120 and zero == two
    assert DataConfig(seed=10) != cfg


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(shards, workers: int) -> None:
    cfg = DataConfig(seed=4, tokens_per_batch=2500)
    straight = collect(make_loader(shards, cfg, num_workers=workers), limit=30)
    position = StreamPosition(workers)
    first = []
    for batch in make_loader(shards, cfg, num_workers=workers):
        first.append(batch)
        position.update(batch)
        if len(first) == 13:
            break
    resumed = collect(make_loader(shards, cfg, num_workers=workers,
                                  position=position.state()), limit=17)
    for a, b in zip(straight, first + resumed, strict=True):
        assert a["clusters"] == b["clusters"]
        assert a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"])
    assert straight[-1]["epoch"] >= 1  # the run crossed an epoch boundary


def test_resume_needs_the_same_worker_count(shards) -> None:
    cfg = DataConfig(seed=4)
    state = StreamPosition(2).state()
    with pytest.raises(ValueError, match="saved with 2 loader workers"):
        collect(make_loader(shards, cfg, num_workers=0, position=state), limit=1)


def test_no_valid_or_test_cluster_reaches_the_train_loader(sample_build) -> None:
    splits = pl.read_parquet(sample_build.out / "splits.parquet")
    held_out = set(splits.filter(pl.col("split") != "train").get_column("rep50"))
    train = set(splits.filter(pl.col("split") == "train").get_column("rep50"))
    loader = make_loader(split_shards(sample_build.out, "train"), DataConfig(), epochs=1)
    seen = {c for batch in loader for c in batch["clusters"]}
    assert seen == train and not seen & held_out
