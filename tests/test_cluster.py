from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.generate import _mutate, _random_sequence
from pipeline.pins import read_pins
from pipeline.split import split, split_of
from tests.builds import build_config, run_leakage, run_stages, run_through_split
from tests.helpers import LETTERS, REPO, shared_file, substitute, write_fasta


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    """Families: a root, a 97% copy, a 70% relative; plus unrelated sequences."""
    rng = np.random.default_rng(42)
    records = []
    for fam in range(4):
        root = _random_sequence(rng, int(rng.integers(250, 400)))
        variants = {"root": root, "near": substitute(rng, root, 0.97),
                    "far": substitute(rng, root, 0.70)}
        for name, seq in variants.items():
            records.append((f"F{fam}{name}", LETTERS[seq].tobytes().decode()))
    for i in range(6):
        seq = _mutate(rng, _random_sequence(rng, 300), 0.0)
        records.append((f"U{i}", LETTERS[seq].tobytes().decode()))
    tmp = tmp_path_factory.mktemp("constructed")
    fasta = write_fasta(tmp / "fam.fa", "".join(f">{a} family\n{s}\n" for a, s in records))
    cfg = build_config(tmp / "build", [fasta])
    run_through_split(cfg)
    return cfg, pl.read_parquet(tmp / "build" / "clusters.parquet")


def test_constructed_families_cluster_as_uniref(constructed) -> None:
    _, clusters = constructed
    rep = {row["accession"]: row for row in clusters.iter_rows(named=True)}
    for fam in range(4):
        root, near, far = (rep[f"F{fam}{n}"] for n in ("root", "near", "far"))
        assert root["rep90"] == near["rep90"], fam  # >= 95% identity: same UniRef90
        assert root["rep50"] == far["rep50"], fam  # ~70%: same UniRef50 ...
        assert root["rep90"] != far["rep90"], fam  # ... but not the same UniRef90
    unrelated = [rep[f"U{i}"] for i in range(6)]
    others = {r["rep50"] for a, r in rep.items() if not a.startswith("U")}
    assert len({u["rep50"] for u in unrelated}) == 6
    assert not {u["rep50"] for u in unrelated} & others
    assert clusters.get_column("rep90").str.starts_with("UniRef90_").all()


def test_cluster_members_all_keep_a_split(constructed) -> None:
    cfg, clusters = constructed
    splits = pl.read_parquet(f"{cfg.out_dir}/splits.parquet")
    joined = clusters.join(splits, on="rep50", how="left")
    assert joined.get_column("split").null_count() == 0
    assert joined.group_by("rep50").agg(pl.col("split").n_unique()).get_column("split").max() == 1


def test_split_hash_is_seeded_and_uniform() -> None:
    ids = [f"UniRef50_X{i}" for i in range(20_000)]
    draws = [split_of(i, 0, 0.1, 0.2) for i in ids]
    assert abs(draws.count("valid") / len(ids) - 0.1) < 0.01
    assert abs(draws.count("test") / len(ids) - 0.2) < 0.01
    assert draws != [split_of(i, 1, 0.1, 0.2) for i in ids]
    assert draws == [split_of(i, 0, 0.1, 0.2) for i in ids]


def test_pins_validation(tmp_path) -> None:
    good = tmp_path / "pins.tsv"
    good.write_text("rep50\tsplit\nUniRef50_A\tvalid\nP12345\texcluded\n")
    assert read_pins(good).to_dicts() == [{"id": "UniRef50_A", "split": "valid"},
                                          {"id": "P12345", "split": "excluded"}]
    bad = tmp_path / "bad.tsv"
    bad.write_text("UniRef50_A\tholdout\n")
    with pytest.raises(PipelineError, match="unknown split 'holdout'"):
        read_pins(bad)
    with pytest.raises(PipelineError, match="not found"):
        read_pins(tmp_path / "nope.tsv")


def test_pins_move_whole_groups(constructed, tmp_path) -> None:
    cfg, _ = constructed

    first = pl.read_parquet(f"{cfg.out_dir}/splits.parquet")
    target = first.filter(pl.col("split") == "train").get_column("rep50")[0]
    pins = tmp_path / "pins.tsv"
    pins.write_text(f"{target}\ttest\nUniRef50_GONE\tvalid\n")
    pinned_cfg = cfg.split.model_copy(update={"pins": str(pins)})
    stats = split(cfg.out_dir, pinned_cfg, cfg.seed)
    after = pl.read_parquet(f"{cfg.out_dir}/splits.parquet")
    assert after.filter(pl.col("rep50") == target).get_column("split").item() == "test"
    assert stats["pinned_clusters"] == 1 and stats["pins_not_in_build"] == 1
    split(cfg.out_dir, cfg.split, cfg.seed)  # restore for other tests


def test_real_families_cluster_purely_and_do_not_leak(tmp_path) -> None:
    """OpenFold jackhmmer hits: real homologous families (their TSV names each record's)."""
    hits = shared_file("openfold_msa_uniprot_hits.fasta.gz")
    query = shared_file("mmseqs2_examples_query.fasta.gz")
    families = pl.read_csv(shared_file("openfold_msa_hits_families.tsv"), separator="\t")
    cfg = build_config(tmp_path / "b", [hits, query])
    run_through_split(cfg)
    clusters = pl.read_parquet(tmp_path / "b" / "clusters.parquet")
    fam = families.filter(pl.col("source_db") == "uniprot").select(
        pl.col("seq_id").str.split("|").list.get(1).alias("accession"), "family"
    )
    labelled = clusters.join(fam, on="accession")
    assert labelled.height == 2692
    purity = labelled.group_by("rep50").agg(pl.col("family").n_unique().alias("n"))
    assert purity.get_column("n").max() == 1  # no UniRef50 cluster mixes two families
    splits = pl.read_parquet(tmp_path / "b" / "splits.parquet")
    per_cluster = clusters.join(splits, on="rep50").group_by("rep50").agg(
        pl.col("split").n_unique())
    assert per_cluster.get_column("split").max() == 1
    assert set(splits.get_column("split")) == {"train", "valid", "test"}
    report = run_leakage(cfg)
    assert report["queries"] > 50
    assert report["fraction_at_or_above_threshold"] <= cfg.leakage.max_fraction
    assert sum(report["best_hit_identity_histogram"].values()) == report["queries"]
    log = (tmp_path / "b" / "logs" / "split.mmseqs.log").read_text()
    assert "-s 5.7" in log and "--max-seqs 100" in log

    # Querying every distinct sequence adds queries (each query's hits do not depend on the
    # others), so its split groups can only merge the default's (UniRef90 representatives).
    default_groups = splits.select("rep50", "group")
    split(cfg.out_dir, cfg.split.model_copy(update={"link_queries": "all"}), cfg.seed)
    wider = pl.read_parquet(tmp_path / "b" / "splits.parquet").select("rep50", "group")
    joined = default_groups.join(wider, on="rep50", suffix="_all")
    assert joined.height == default_groups.height
    per_group = joined.group_by("group").agg(pl.col("group_all").n_unique())
    assert per_group.get_column("group_all").max() == 1
    assert wider.get_column("group").n_unique() <= default_groups.get_column("group").n_unique()


@pytest.mark.parametrize("threads", [2, 1])
def test_two_runs_are_byte_identical(constructed, tmp_path, threads: int) -> None:
    """Same input + config ⇒ same bytes; also across MMseqs2 thread counts (1 vs 2)."""
    cfg, _ = constructed
    src = cfg.inputs[0].url
    again = build_config(tmp_path / "again", [src], threads=threads)
    run_through_split(again)
    for name in ("sequences.parquet", "records.parquet", "clusters.parquet", "splits.parquet"):
        ours = (tmp_path / "again" / name).read_bytes()
        assert ours == (Path(cfg.out_dir) / name).read_bytes(), name


def test_a_clean_split_is_a_result(tmp_path) -> None:
    """Unrelated sequences: no held-out sequence has any train hit, so linking finds nothing
    and the leakage report says 0 with no closest pairs (it used to crash on the empty hits)."""
    rng = np.random.default_rng(7)
    aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    text = "".join(f">sp|R{i:04d}|R{i}_RAND Random OX=9606\n"
                   f"{''.join(rng.choice(aa, size=int(rng.integers(80, 300))))}\n"
                   for i in range(200))
    fasta = write_fasta(tmp_path / "random.fasta", text)
    cfg = build_config(tmp_path / "out", [fasta], split={"valid_fraction": 0.2,
                                                         "test_fraction": 0.2})
    run_through_split(cfg)
    report = run_leakage(cfg)
    assert report["queries"] > 0 and report["queries_with_hit"] == 0
    assert report["fraction_at_or_above_threshold"] == 0.0 and report["closest_pairs"] == []
    assert report["best_hit_identity_histogram"]["no_hit"] == report["queries"]
    saved = json.loads((tmp_path / "out" / "stats" / "leakage.json").read_text())
    assert saved["closest_pairs"] == [] and saved["at_or_above_threshold"] == 0
    split_stats = json.loads((tmp_path / "out" / "stats" / "split.json").read_text())
    assert split_stats["cluster_links"] == 0
    assert sum(s["uniref50_clusters"] for s in split_stats["splits"].values()) == 200


def test_mmseqs_runs_its_parallel_steps_through_the_configured_runner(tmp_path) -> None:
    """cluster.runner becomes MMseqs2's RUNNER: a wrapper that records its argv and runs the
    command sees the workflows' parallel steps, and the clusters are the same bytes."""
    from pipeline.config import stage_config
    from pipeline.generate import write_families
    from pipeline.ingest import ingest
    from pipeline.stages import run_stage

    fasta = write_families(tmp_path / "fam.fasta", 400, seed=3)
    record = tmp_path / "runner.log"
    runner = tmp_path / "runner.sh"
    runner.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexec "$@"\n')
    runner.chmod(0o755)
    plain = build_config(tmp_path / "plain", [fasta])
    wrapped = build_config(tmp_path / "wrapped", [fasta], cluster={"runner": str(runner)})
    for cfg in (plain, wrapped):
        ingest([fasta], cfg.out_dir)
        run_stage("cluster", cfg)
    calls = record.read_text().splitlines()
    steps = {line.split()[1] for line in calls}
    assert {"prefilter", "align"} <= steps, steps  # the cascade's parallel steps
    assert all(line.split()[0].endswith("mmseqs") for line in calls)
    for name in ("clusters.parquet", "cluster_links.parquet"):
        assert (tmp_path / "plain" / name).read_bytes() == (
            tmp_path / "wrapped" / name).read_bytes()
    assert stage_config(plain, "cluster") == stage_config(wrapped, "cluster")  # no rerun


@pytest.mark.parametrize("fasta", [
    ">sp|P1|ONE\nMKVLAAGIVALLLAAGCSSAKEETTQ\n",
    ">sp|P1|A\nMKVLAAGIVALLLAAGCSSAKEETTQ\n>tr|Q1|SAME\nMKVLAAGIVALLLAAGCSSAKEETTQ\n",
], ids=["one-sequence", "one-distinct-sequence"])
def test_every_stage_handles_empty_intermediates(tmp_path: Path, fasta: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A build with one distinct sequence: one cluster, no cross-cluster link, empty valid and
    test splits, no held-out query, empty shard splits, an empty validation set. Every stage
    finishes with a valid (empty) output, and the manifest verifies."""
    from pipeline.cli import main
    from pipeline.shard_reader import SplitIndex

    inp = write_fasta(tmp_path / "one.fa", fasta)
    out = tmp_path / "build"
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump({"build": "one", "out_dir": str(out),
                                      "manifest_dir": str(tmp_path / "m"),
                                      "inputs": [{"url": str(inp)}]}))
    for stage in ("download", "ingest", "cluster", "split", "check-leakage", "shards",
                  "validation", "manifest"):
        assert main([stage, "--config", str(config)]) == 0, stage
    assert pl.read_parquet(out / "cluster_links.parquet").height == 0
    assert pl.read_parquet(out / "splits.parquet").get_column("split").to_list() == ["train"]
    leakage = json.loads((out / "stats" / "leakage.json").read_text())
    assert leakage["queries"] == 0 and leakage["fraction_at_or_above_threshold"] == 0.0
    assert leakage["closest_pairs"] == []
    for name, samples in (("train", 1), ("valid", 0), ("test", 0)):
        assert len(SplitIndex(out / "shards" / name)) == samples, name
    validation = json.loads((out / "stats" / "validation.json").read_text())
    assert validation["sequences"] == 0 and validation["residues"] == 0
    assert (out / "validation" / "validation.fasta").read_text() == ""
    assert len(SplitIndex(out / "validation")) == 0
    assert "the valid split is empty" in caplog.text
    assert main(["verify", str(tmp_path / "m" / "one.json")]) == 0


def test_single_step_clustering_links_a_chain_the_greedy_clusters_cut(tmp_path) -> None:
    """A 320-residue protein A, B at 60% of A, C at 60% of B (~37% of A): greedy clustering puts
    B with A and leaves C alone, and the single-step clustering's B-C alignment (all pairs are
    aligned, as config/uniprot.yaml clusters UniRef50) links the two clusters."""

    rng = np.random.default_rng(21)
    a = _random_sequence(rng, 320)
    b = substitute(rng, a[:300], 0.6)
    c = substitute(rng, b[:290], 0.6)
    fasta = write_fasta(tmp_path / "chain.fa", "".join(
        f">{name} chain\n{LETTERS[seq].tobytes().decode()}\n"
        for name, seq in (("A", a), ("B", b), ("C", c))))
    uniref50 = yaml.safe_load((REPO / "config" / "uniprot.yaml").read_text())["cluster"]["uniref50"]
    assert "--single-step-clustering" in uniref50["extra_args"]
    cfg = build_config(tmp_path / "b", [fasta], cluster={"uniref50": uniref50})
    run_stages(cfg, "download", "ingest", "cluster")
    rep50 = dict(pl.read_parquet(tmp_path / "b" / "clusters.parquet")
                 .select("accession", "rep50").iter_rows())
    assert rep50 == {"A": "UniRef50_A", "B": "UniRef50_A", "C": "UniRef50_C"}
    links = pl.read_parquet(tmp_path / "b" / "cluster_links.parquet")
    assert links.select("a", "b").rows() == [("UniRef50_A", "UniRef50_C")]
    assert 0.5 <= links.get_column("identity").item() <= 0.7
    assert "--single-step-clustering 1" in (tmp_path / "b" / "logs" / "cluster.mmseqs.log"
                                            ).read_text()
