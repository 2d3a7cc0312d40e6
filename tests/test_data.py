from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import chisquare

from pipeline.errors import PipelineError
from pipeline.shard_reader import SplitIndex
from pipeline.shards import ClusterSample, ShardWriter
from training.alphabet import CLS, EOS, IGNORE_INDEX, MASK
from training.data.batches import DataConfig, make_example, make_loader
from training.data.sampler import EpochOrder, Position, assign, global_batches

AA = np.array(list("LAGVSERTIDPKQNFYMHWC"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The split directory of 60 clusters of 1-5 members (some longer than the crop), several
    shards."""
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
    return root / "train"


def collect(loader, limit: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        assert "error" not in batch, batch.get("error")
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def steps(split_dir: Path, cfg: DataConfig, tokens_per_step: int, world: int, workers: int = 0,
          start: Position | None = None, epochs: int | None = 1, limit: int | None = None
          ) -> list[dict]:
    """Per global step: the clusters each rank trained on, and their tensors, across ranks."""
    per_rank = [collect(make_loader(split_dir, cfg, tokens_per_step, rank, world, workers, start,
                                    epochs)) for rank in range(world)]
    out: list[dict] = []
    for rank, batches in enumerate(per_rank):
        i = 0
        for batch in batches:
            if batch["micro"] == 0:
                if rank == 0:
                    out.append({"key": (batch["epoch"], batch["batch"]), "clusters": set(),
                                "tensors": {}, "micros": batch["micros"], "end": batch["end"]})
                step = out[i]
                i += 1
                assert step["key"] == (batch["epoch"], batch["batch"])
                assert step["micros"] == batch["micros"]  # every rank: the same micro-steps
            for c, ids, labels in per_example(batch):
                step["clusters"].add(c)
                step["tensors"][c] = (ids, labels)
        assert i == len(out)
    return out[:limit]


def per_example(batch: dict) -> list[tuple[str, list, list]]:
    if "seq_ids" not in batch:
        rows = []
        for r, c in enumerate(batch["clusters"]):
            keep = batch["input_ids"][r] != 1
            ids, labels = batch["input_ids"][r][keep], batch["labels"][r][keep]
            rows.append((c, ids.tolist(), labels.tolist()))
        return rows
    seq = batch["seq_ids"][0]
    return [(c, batch["input_ids"][0][seq == i].tolist(), batch["labels"][0][seq == i].tolist())
            for i, c in enumerate(batch["clusters"])]


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
    for batch in collect(make_loader(shards, cfg, 8192, epochs=1)):
        ids = batch["input_ids"]
        assert ids.shape[1] <= 1024 and ids.numel() <= 4096
        assert (ids[:, 0] == CLS).all()
    packed = DataConfig(seed=0, tokens_per_batch=4096, packed=True)
    for batch in collect(make_loader(shards, packed, 8192, epochs=1)):
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 4096
        assert batch["seq_ids"].max().item() + 1 == len(batch["clusters"])


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    a = EpochOrder(1000, 3, 0, 64).full()
    assert sorted(a.tolist()) == list(range(1000))
    assert a.tolist() == EpochOrder(1000, 3, 0, 64).full().tolist()
    assert a.tolist() != EpochOrder(1000, 3, 1, 64).full().tolist()
    assert a.tolist() != EpochOrder(1000, 4, 0, 64).full().tolist()
    order = EpochOrder(1000, 3, 0, 64)
    for offset in (0, 1, 63, 64, 500, 999, 1000):
        assert np.concatenate([np.zeros(0, np.int64), *order.from_offset(offset)]).tolist() == (
            a[offset:].tolist())


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_assign_balances_and_fits(world: int, packed: bool) -> None:
    rng = np.random.default_rng(world)
    lengths = rng.integers(30, 1025, size=50).tolist()
    shares = assign(lengths, world, 4096, packed)
    micros = {len(s) for s in shares}
    assert len(micros) == 1  # every rank the same number of micro-batches
    flat = sorted(i for s in shares for m in s for i in m)
    assert flat == list(range(50))  # every example exactly once
    loads = []
    for share in shares:
        costs = [sum(lengths[i] for i in micro) if packed else (
            max((lengths[i] for i in micro), default=0) * len(micro)) for micro in share]
        assert max(costs) <= 4096
        loads.append(sum(costs))
    # balanced: ranks' token loads (padded: rows x width) within one example per micro-batch
    assert max(loads) - min(loads) <= len(shares[0]) * 1025
    assert shares == assign(lengths, world, 4096, packed)
    with pytest.raises(ValueError, match="exceeds tokens_per_batch"):
        assign([5000], world, 4096, packed)


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 0), (2, 2), (4, 0), (4, 1)])
def test_global_steps_are_the_same_for_any_world_size_and_worker_count(
        shards, world: int, workers: int) -> None:
    cfg = DataConfig(seed=3, tokens_per_batch=2048, shuffle_chunk=16)
    reference = steps(shards, cfg, 3000, world=1, epochs=2)
    got = steps(shards, cfg, 3000, world=world, workers=workers, epochs=2)
    assert [s["key"] for s in got] == [s["key"] for s in reference]
    for a, b in zip(reference, got, strict=True):
        assert a["clusters"] == b["clusters"]
        assert a["tensors"] == b["tensors"]  # same member, crop and masking
    for epoch in (0, 1):  # every train cluster exactly once per epoch
        seen = [c for s in got if s["key"][0] == epoch for c in s["clusters"]]
        assert len(seen) == 60 and len(set(seen)) == 60
    assert {c for s in got[:3] for c in s["clusters"]} != {
        c for s in got if s["key"][0] == 1 for c in s["clusters"]} or len(got) < 6


def test_resume_from_a_position_on_another_world_size(shards) -> None:
    cfg = DataConfig(seed=4, tokens_per_batch=2500, shuffle_chunk=8)
    straight = steps(shards, cfg, 4000, world=2, epochs=2)
    cut = 5
    resumed = steps(shards, cfg, 4000, world=4, workers=2,
                    start=Position.from_dict(straight[cut - 1]["end"]), epochs=2)
    assert [s["clusters"] for s in straight[cut:]] == [s["clusters"] for s in resumed]
    assert [s["tensors"] for s in straight[cut:]] == [s["tensors"] for s in resumed]
    assert straight[-1]["key"][0] == 1  # the run crossed an epoch boundary


def test_a_single_cluster_split_feeds_every_rank(tmp_path) -> None:
    writer = ShardWriter(tmp_path / "train", "train", max_bytes=1 << 20)
    writer.write(ClusterSample("UniRef50_ONLY", 1, ["UniRef90_ONLY"], [1], ["MKTAYIAKQR"]))
    writer.finish()
    got = steps(tmp_path / "train", DataConfig(seed=0), 4096, world=2, epochs=3)
    assert [s["clusters"] for s in got] == [{"UniRef50_ONLY"}] * 3
    batch = collect(make_loader(tmp_path / "train", DataConfig(), 4096, 1, 2, epochs=1))[0]
    assert batch["clusters"] == [] and (batch["labels"] == IGNORE_INDEX).all()  # nothing to learn


def test_a_damaged_shard_names_the_shard_and_the_sample(shards, tmp_path) -> None:
    import shutil

    bad = tmp_path / "train"
    shutil.copytree(shards, bad)
    first = sorted(bad.glob("*.tar"))[0]
    data = bytearray(first.read_bytes())
    at = data.index(b'"sequences":["') + 20
    data[at] = 0xFF  # not UTF-8
    first.write_bytes(bytes(data))
    errors = [b["error"] for b in make_loader(bad, DataConfig(), 10**6, epochs=1) if "error" in b]
    assert len(errors) == 1
    assert str(first) in errors[0] and "sample UniRef50_C" in errors[0]
    first.write_bytes(b"not a tar file" * 100)
    errors = [b["error"] for b in make_loader(bad, DataConfig(), 10**6, epochs=1) if "error" in b]
    assert errors and str(first) in errors[0]
    first.unlink()
    errors = [b["error"] for b in make_loader(bad, DataConfig(), 10**6, epochs=1) if "error" in b]
    assert errors and f"{first}: shard missing" in errors[0]
    (bad / "keys.npy").unlink()
    with pytest.raises(PipelineError, match=r"keys\.npy"):
        make_loader(bad, DataConfig())


def test_split_arrays_describe_the_shards(shards) -> None:
    from pipeline.shard_reader import iter_clusters
    from pipeline.shards import shard_paths

    index = SplitIndex(shards)
    samples = list(iter_clusters(shard_paths(shards)))
    assert len(index) == len(samples) == 60
    for i, s in enumerate(samples):
        lengths = index.lengths[index.offsets[i]:index.offsets[i + 1]].tolist()
        assert lengths == [len(q) for q in s.sequences]
    batches = list(global_batches(index, 0, 1022, 5000, 16, epochs=1))
    assert sum(len(b.indices) for b in batches) == 60
    assert all(b.lengths.sum() <= 5000 or len(b.indices) == 1 for b in batches)


def test_members_are_drawn_uniformly(shards) -> None:
    from pipeline.shard_reader import iter_clusters
    from pipeline.shards import shard_paths

    sample = next(s for s in iter_clusters(shard_paths(shards)) if s.uniref90_count == 4)
    cfg = DataConfig(seed=5)
    counts = Counter(make_example(sample, epoch, cfg).member for epoch in range(4000))
    assert sorted(counts) == [0, 1, 2, 3]
    assert chisquare(list(counts.values())).pvalue > 0.001


def test_no_valid_or_test_cluster_reaches_the_train_loader(sample_build) -> None:
    splits = pl.read_parquet(sample_build.out / "splits.parquet")
    held_out = set(splits.filter(pl.col("split") != "train").get_column("rep50"))
    train = set(splits.filter(pl.col("split") == "train").get_column("rep50"))
    loader = make_loader(sample_build.out / "shards" / "train", DataConfig(), epochs=1)
    seen = {c for batch in collect(loader) for c in batch["clusters"]}
    assert seen == train and not seen & held_out
