"""Decontamination against evaluation sets, and pins from elsewhere (the decontaminate stage)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.build_dir import EXCLUDED
from pipeline.checksums import sha256_file
from pipeline.decontaminate import _moved_clusters
from pipeline.errors import PipelineError
from pipeline.export import export_table
from pipeline.generate import _random_sequence
from pipeline.pins import group_pins, resolve_pins
from pipeline.shard_reader import iter_clusters
from pipeline.split import final_splits, sequence_splits
from pipeline.stages import run_stage
from tests.builds import build_config, run_stages, run_through_split
from tests.helpers import LETTERS, substitute, write_fasta

LEVELS = (0.95, 0.70, 0.40)  # planted identities; the default threshold is 0.5
PER_LEVEL = 3
SPLIT = {"valid_fraction": 0.2, "test_fraction": 0.2, "link_identity": None}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """40 unrelated proteins, 8 with a 97% copy (two-member clusters), built through split."""
    rng = np.random.default_rng(3)
    records = []
    for i in range(40):
        root = _random_sequence(rng, int(rng.integers(150, 350)))
        records.append((f"R{i:02d}", root))
        if i % 5 == 0:
            records.append((f"C{i:02d}", substitute(rng, root, 0.97)))
    tmp = tmp_path_factory.mktemp("decontaminate")
    fasta = write_fasta(tmp / "proteins.fa", "".join(
        f">{name} protein\n{LETTERS[seq].tobytes().decode()}\n" for name, seq in records))
    cfg = build_config(tmp / "build", [fasta], split=SPLIT)
    run_through_split(cfg)
    return tmp, fasta, dict(records)


def with_sets(tmp: Path, fasta: Path, *sets: dict, **sections: object):
    return build_config(tmp / "build", [fasta], split={**SPLIT, **sections.pop("split", {})},
                        decontaminate=list(sets), **sections)


def train_sources(cfg) -> pl.DataFrame:
    """(accession, rep50) of the train sequences that represent their UniRef50 cluster."""
    clusters = pl.read_parquet(cfg.out.clusters)
    splits = pl.read_parquet(cfg.out.splits)
    return (clusters.join(splits, on="rep50").filter(pl.col("split") == "train")
            .filter(pl.col("rep50") == "UniRef50_" + pl.col("accession"))
            .select("accession", "rep50").sort("accession"))


def shard_keys(out: Path) -> dict[str, set[str]]:
    return {split: {s.cluster for s in iter_clusters(sorted((out / "shards" / split).glob(
        "*.tar")))} for split in ("train", "valid", "test")}


def test_planted_contamination_leaves_train_by_whole_groups(build) -> None:
    tmp, fasta, sequences = build
    plain = build_config(tmp / "build", [fasta], split=SPLIT)
    sources = train_sources(plain).head(PER_LEVEL * len(LEVELS))
    assert sources.height == PER_LEVEL * len(LEVELS)
    rng = np.random.default_rng(11)
    planted, expected = [], set()
    for k, (acc, rep50) in enumerate(sources.iter_rows()):
        level = LEVELS[k // PER_LEVEL]
        mutant = substitute(rng, sequences[acc], level)
        residues = LETTERS[mutant].tobytes().decode()
        planted.append(f">E{round(level * 100)}_{acc} planted\n{residues}\n")
        if level >= 0.5:
            expected.add(rep50)
    evaluation = write_fasta(tmp / "planted.fasta.gz", "".join(planted))
    cfg = with_sets(tmp, fasta, {"name": "planted", "url": str(evaluation)})
    stats = run_stage("decontaminate", cfg)

    report = stats["sets"]["planted"]
    assert report["sequences"] == 9
    assert report["sequences_with_hit"] == 6  # the 95% and 70% ones, not the 40% ones
    assert report["sha256"] == sha256_file(evaluation)
    assert sum(report["best_hit_identity_histogram"].values()) == 9
    assert report["best_hit_identity_histogram"]["0.90-0.95"] + \
        report["best_hit_identity_histogram"]["0.95-1.00"] == 3
    assert {p["evaluation"][:3] for p in report["closest_pairs"]} == {"E95", "E70"}
    assert all(p["identity"] >= 0.69 for p in report["closest_pairs"])
    moved = pl.read_parquet(cfg.out.decontamination)
    assert set(moved.get_column("rep50")) == expected
    assert set(moved.get_column("set")) == {"planted"}
    clusters = pl.read_parquet(cfg.out.clusters)
    records = clusters.filter(pl.col("rep50").is_in(list(expected))).height
    assert records > len(expected)  # a two-member cluster among them: its copy leaves too
    assert stats["excluded"]["uniref50_clusters"] == report["excluded"]["uniref50_clusters"] == 6
    assert stats["excluded"]["sequences"] == records
    assert stats["train_after"]["uniref50_clusters"] == \
        stats["train_before"]["uniref50_clusters"] - 6
    assert json.loads(cfg.out.stats("decontamination").read_text()) == stats

    final = final_splits(cfg.out, decontaminated=True)
    assert set(final.filter(pl.col("split") == EXCLUDED).get_column("rep50")) == expected
    run_stage("shards", cfg)
    keys = shard_keys(cfg.out.root)
    assert not expected & set().union(*keys.values())  # in no shard at all
    export_table(cfg.out_dir, "train", tmp / "train.parquet", decontaminated=True)
    exported = set(pl.read_parquet(tmp / "train.parquet").get_column("ur50_id"))
    assert exported == keys["train"]  # the flat table leaves them out too
    weak = set(sources.get_column("rep50")) - expected
    assert weak <= keys["train"]  # the 40% ones' clusters stay in train
    assert len(keys["train"]) == stats["train_after"]["uniref50_clusters"]


def test_a_set_without_hits_leaves_the_shards_byte_identical(build) -> None:
    tmp, fasta, _ = build
    plain = build_config(tmp / "build", [fasta], split=SPLIT)
    run_stage("shards", plain)
    before = {p.relative_to(plain.out.shards): sha256_file(p)
              for p in sorted(plain.out.shards.rglob("*")) if p.is_file()}
    rng = np.random.default_rng(5)
    unrelated = "".join(f">U{i}\n{LETTERS[_random_sequence(rng, 200)].tobytes().decode()}\n"
                        for i in range(4))
    cfg = with_sets(tmp, fasta, {"name": "unrelated", "url": str(
        write_fasta(tmp / "unrelated.fasta", unrelated))})
    stats = run_stage("decontaminate", cfg)
    assert stats["sets"]["unrelated"]["sequences_with_hit"] == 0
    assert stats["sets"]["unrelated"]["closest_pairs"] == []
    assert stats["excluded"] == {"groups": 0, "uniref50_clusters": 0, "uniref90_clusters": 0,
                                 "sequences": 0, "residues": 0}
    assert pl.read_parquet(cfg.out.decontamination).height == 0
    run_stage("shards", cfg)
    after = {p.relative_to(cfg.out.shards): sha256_file(p)
             for p in sorted(cfg.out.shards.rglob("*")) if p.is_file()}
    assert after == before


@pytest.mark.parametrize(("content", "message"), [
    (None, r"decontaminate set 'bad': .*missing\.fasta"),
    (">E1 ok\nMKV\n>E2 broken\nMK1V\n", r"decontaminate set 'bad' .*bad\.fasta: record E2 "
                                        r"\(line 3\): invalid residue '1' at position 3"),
    ("", r"decontaminate set 'bad' \(.*bad\.fasta\): .*bad\.fasta: empty file"),
    (b"\x1f\x8b\x08\x00truncated", r"decontaminate set 'bad' .*bad\.fasta\.gz"),
], ids=["missing", "invalid-residue", "empty", "truncated-gzip"])
def test_a_bad_set_is_one_line_and_writes_nothing(build, content, message) -> None:
    tmp, fasta, _ = build
    out = tmp / "build"
    for path in (out / "decontamination.parquet", out / "stats" / "decontamination.json"):
        path.unlink(missing_ok=True)
    shutil.rmtree(out / "raw" / "evaluation_sets", ignore_errors=True)
    if content is None:
        url = tmp / "missing.fasta"
    elif isinstance(content, bytes):
        url = tmp / "bad.fasta.gz"
        url.write_bytes(content)
    else:
        url = write_fasta(tmp / "bad.fasta", content)
    good = write_fasta(tmp / "good.fasta", ">G1\nMKVLA\n")
    cfg = with_sets(tmp, fasta, {"name": "good", "url": str(good)},
                    {"name": "bad", "url": str(url)})
    with pytest.raises(PipelineError, match=message) as err:
        run_stage("decontaminate", cfg)
    assert "\n" not in str(err.value)
    assert not (out / "decontamination.parquet").exists()
    assert not (out / "stats" / "decontamination.json").exists()


def test_a_checksum_mismatch_names_the_set(build) -> None:
    tmp, fasta, _ = build
    url = write_fasta(tmp / "sum.fasta", ">S1\nMKVLA\n")
    cfg = with_sets(tmp, fasta, {"name": "summed", "url": str(url), "md5": "0" * 32})
    with pytest.raises(PipelineError, match=r"decontaminate set 'summed': .*md5"):
        run_stage("decontaminate", cfg)


def test_pin_lists_pin_uniprot_and_uniref50_ids_to_a_split_or_out(build) -> None:
    tmp, fasta, _ = build
    plain = build_config(tmp / "build", [fasta], split=SPLIT)
    sources = train_sources(plain)
    clusters = pl.read_parquet(plain.out.clusters)
    (_, out_rep), (valid_acc, valid_rep) = sources.row(0), sources.row(1)
    copy_acc = clusters.filter(pl.col("accession").str.starts_with("C")
                               & ~pl.col("rep50").is_in([out_rep, valid_rep])).row(0, named=True)
    excluded = tmp / "excluded.txt"
    excluded.write_text(f"# held out elsewhere\n{out_rep}\n{copy_acc['accession']}  # member\n"
                        "UniRef50_NOT_HERE\n")
    valid = tmp / "valid.txt"
    valid.write_text(f"UniRef50_{valid_acc}\n")
    cfg = build_config(tmp / "build", [fasta], split={**SPLIT, "pin_lists": [
        {"path": str(excluded), "split": "excluded"}, {"path": str(valid), "split": "valid"}]})
    stats = run_stage("split", cfg)
    table = pl.read_parquet(cfg.out.splits)
    split_of = dict(table.select("rep50", "split").iter_rows())
    assert split_of[out_rep] == split_of[copy_acc["rep50"]] == EXCLUDED
    assert split_of[valid_rep] == "valid"
    assert stats["pinned_clusters"] == 3 and stats["pins_not_in_build"] == 1
    assert stats[EXCLUDED]["uniref50_clusters"] == 2
    leakage = run_stage("check-leakage", cfg.model_copy(update={"leakage": cfg.leakage.model_copy(
        update={"max_fraction": 1.0})}))
    rows = sequence_splits(cfg.out)
    assert leakage["held_out_sequences"] == rows.filter(
        pl.col("split").is_in(["valid", "test"])).height < rows.filter(
        pl.col("split") != "train").height  # the excluded are not held out
    run_stage("shards", cfg)
    keys = shard_keys(cfg.out.root)
    assert not {out_rep, copy_acc["rep50"]} & set().union(*keys.values())
    assert valid_rep in keys["valid"]
    run_stages(build_config(tmp / "build", [fasta], split=SPLIT), "split")  # restore


def test_excluded_pins_win_and_disagreements_go_to_train() -> None:
    pinned = pl.DataFrame({"group": ["g1", "g1", "g2", "g2", "g3"],
                           "split": ["valid", EXCLUDED, "valid", "test", "test"]})
    got = dict(group_pins(pinned).select("group", "group_split").iter_rows())
    assert got == {"g1": EXCLUDED, "g2": "train", "g3": "test"}


def test_ids_resolve_to_this_builds_clusters() -> None:
    clusters = pl.DataFrame({"accession": ["P1", "P2", "Q9"],
                             "rep50": ["UniRef50_P1", "UniRef50_P1", "UniRef50_Q9"]})
    pins = pl.DataFrame({"id": ["UniRef50_Q9", "P2", "UniRef90_P1", "UniRef50_X", "X"],
                         "split": ["valid", "test", "test", "valid", "valid"]})
    got = resolve_pins(pins, clusters).sort("id")
    assert got.rows() == [("UniRef50_P1", "test", "P2"), ("UniRef50_Q9", "valid", "UniRef50_Q9"),
                          ("UniRef50_P1", "test", "UniRef90_P1")]


def test_a_hit_moves_every_train_cluster_of_its_group() -> None:
    table = pl.DataFrame({"rep50": ["A", "B", "C", "D"], "group": ["A", "A", "C", "D"],
                          "split": ["train", "train", "train", "valid"]})
    hits = pl.DataFrame({"group": ["A", "D"], "set": ["s", "s"], "query": ["q1", "q2"],
                         "target": ["b1", "d1"], "identity": [0.8, 0.9]})
    moved = _moved_clusters(table, [hits])
    assert moved.get_column("rep50").to_list() == ["A", "B"]  # D is not train: untouched
    assert moved.get_column("target").to_list() == ["b1", "b1"]


def test_gzip_sets_are_read(build) -> None:
    tmp, fasta, sequences = build
    seq = LETTERS[next(iter(sequences.values()))].tobytes().decode()
    path = tmp / "gz.fasta.gz"
    path.write_bytes(gzip.compress(f">Z1\n{seq}\n".encode()))
    cfg = with_sets(tmp, fasta, {"name": "gz", "url": str(path)})
    assert run_stage("decontaminate", cfg)["sets"]["gz"]["sequences"] == 1


def test_a_set_edited_in_place_is_read_again(build) -> None:
    """Without a checksum nothing tells a stale copy under raw/ from the set: it is fetched
    again on every run."""
    tmp, fasta, _ = build
    path = write_fasta(tmp / "edited.fasta", ">A1\nMKVLA\n")
    cfg = with_sets(tmp, fasta, {"name": "edited", "url": str(path)})
    assert run_stage("decontaminate", cfg)["sets"]["edited"]["sequences"] == 1
    write_fasta(path, ">A1\nMKVLA\n>A2\nMKVLW\n")
    assert run_stage("decontaminate", cfg)["sets"]["edited"]["sequences"] == 2
