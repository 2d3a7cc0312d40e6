"""The whole sample build via Snakemake: shards contract, manifest, verify, regenerate, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tarfile
import time
from pathlib import Path

import polars as pl
import pytest

from pipeline.cli import main
from pipeline.config import ShardsConfig
from pipeline.shard_reader import iter_clusters
from pipeline.shards import (
    FIELD,
    SPLITS,
    decode_key,
    encode_key,
    read_index,
    shard_paths,
    write_shards,
)
from tests.conftest import SampleBuild, sample_config, snakemake
from tests.helpers import REPO, run_notebook


def outputs(manifest: Path) -> dict[str, str]:
    return {o["path"]: o["sha256"] for o in json.loads(manifest.read_text())["outputs"]}


def test_rebuild_matches_committed_sample_manifest(sample_build: SampleBuild) -> None:
    committed = outputs(REPO / "data_manifests" / "sample.json")
    rebuilt = outputs(sample_build.manifest)
    assert rebuilt == committed


def test_second_run_does_nothing(sample_build: SampleBuild) -> None:
    result = snakemake(sample_build.root, sample_build.config, "--dry-run")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_every_cluster_in_exactly_one_shard_sample(sample_build: SampleBuild) -> None:
    out = sample_build.out
    clusters = pl.read_parquet(out / "clusters.parquet")
    splits = pl.read_parquet(out / "splits.parquet")
    seen: dict[str, str] = {}
    for split in SPLITS:
        expected = clusters.join(splits.filter(pl.col("split") == split), on="rep50")
        samples = list(iter_clusters(shard_paths(out / "shards" / split)))
        keys = [s.cluster for s in samples]
        assert len(keys) == len(set(keys))  # one sample per cluster
        for key in keys:
            assert key not in seen, f"{key} in {seen.get(key)} and {split}"
            seen[key] = split
        assert set(keys) == set(expected.get_column("rep50"))
        # total sequences (UniProt entries) in shards = rows of clusters.parquet for the split
        assert sum(s.uniprot_entries for s in samples) == expected.height
        per90 = expected.group_by("rep90").len()
        assert sum(s.uniref90_count for s in samples) == per90.height
        entries = dict(per90.iter_rows())
        for s in samples:
            assert s.members[0].removeprefix("UniRef90_") == s.cluster.removeprefix("UniRef50_")
            assert [entries[m] for m in s.members] == s.member_entries
            assert len(s.sequences) == len(s.members)
    assert len(seen) == splits.height


def test_shard_sequences_are_the_uniref90_representatives(sample_build: SampleBuild) -> None:
    out = sample_build.out
    seqs = dict(pl.read_parquet(out / "sequences.parquet", columns=["accession", "sequence"])
                .iter_rows())
    for sample in iter_clusters(shard_paths(out / "shards" / "valid")):
        for member, seq in zip(sample.members, sample.sequences, strict=True):
            assert seqs[member.removeprefix("UniRef90_")] == seq


def test_shard_files_are_reproducible_tars(sample_build: SampleBuild) -> None:
    out = sample_build.out
    cfg_max = 262144
    index = read_index(out / "shards" / "train")
    assert index["totals"]["shards"] > 1
    for entry in index["shards"]:
        path = out / "shards" / "train" / entry["file"]
        assert entry["bytes"] <= cfg_max + 10240  # + the tar end-of-archive record
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert len(members) == entry["samples"]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (
                0, 0, 0, "esm2", "esm2", 0o444)
            assert m.name.endswith("." + FIELD)


def test_shards_independent_of_partition_count(sample_build: SampleBuild, tmp_path: Path) -> None:
    """Many on-disk partitions (tiny bucket_bytes) give the same shard bytes as one."""
    for name in ("clusters.parquet", "splits.parquet", "sequences.parquet"):
        shutil.copy(sample_build.out / name, tmp_path / name)
    write_shards(tmp_path, ShardsConfig(max_shard_bytes=262144, bucket_bytes=1 << 12), seed=0)
    for split in SPLITS:
        ours = read_index(tmp_path / "shards" / split)["shards"]
        assert len(ours) >= 1
        assert ours == read_index(sample_build.out / "shards" / split)["shards"]


def test_keys_with_dots_round_trip() -> None:
    for cid in ("UniRef50_P69905", "UniRef50_XP_001.1", "UniRef50_a%b/c"):
        key = encode_key(cid)
        assert "." not in key and "/" not in key
        assert decode_key(key) == cid


def test_verify_passes_then_names_a_changed_shard(
    sample_build: SampleBuild, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(sample_build.manifest), "--out-dir", str(sample_build.out)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(sample_build.out, copy)
    shard = copy / "shards" / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(sample_build.manifest), "--out-dir", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "DIFFERS shards/train/train-000001.tar: sha256 differs" in err
    assert err.count("DIFFERS") == 1
    (copy / "validation" / "validation.fasta").unlink()
    assert main(["verify", str(sample_build.manifest), "--out-dir", str(copy)]) == 1
    assert "validation/validation.fasta: missing" in capsys.readouterr().err
    shutil.copy2(sample_build.out / "shards" / "train" / "train-000001.tar", shard)
    shutil.copy2(sample_build.out / "validation" / "validation.fasta",
                 copy / "validation" / "validation.fasta")
    assert main(["verify", str(sample_build.manifest), "--out-dir", str(copy)]) == 0
    capsys.readouterr()
    (copy / "notes.txt").write_text("an extra file at the top\n")
    (copy / "shards" / "train" / "extra.tar").write_bytes(b"x")
    assert main(["verify", str(sample_build.manifest), "--out-dir", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "notes.txt: not in the manifest" in err
    assert "shards/train/extra.tar: not in the manifest" in err


def test_manifest_content(sample_build: SampleBuild, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads(sample_build.manifest.read_text())
    assert manifest["schema_version"] == 1
    assert manifest["inputs"][0]["sha256"] == (
        "444c769fe60f48f7783f0352145873db3e4a7fe893aab8c33ed55b36cf1cb59f")
    for tool in ("python", "esm2-pretrain", "git", "mmseqs", "polars", "webdataset", "pyarrow"):
        assert manifest["tools"][tool], tool
    assert manifest["counts"]["ingest"]["records_read"] == 4192
    paths = {o["path"]: o for o in manifest["outputs"]}
    assert paths["clusters.parquet"]["records"] == 4192
    assert paths["validation/validation.fasta"]["records"] == 100
    assert main(["stats", str(sample_build.manifest)]) == 0
    text = capsys.readouterr().out
    assert "4,192 records read" in text and "validation: 100 sequences" in text


def test_validation_regenerates_byte_for_byte(
    sample_build: SampleBuild, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "regen"
    assert main(["validation", "--regenerate", str(sample_build.manifest), "--workdir",
                 str(work), "--keep"]) == 0
    assert "every sha256 matches" in capsys.readouterr().out
    for name in ("validation.fasta", "validation.parquet", "validation-000000.tar"):
        assert (work / "validation" / name).read_bytes() == (
            sample_build.out / "validation" / name).read_bytes()
    # a manifest whose recorded validation hash is wrong is reported
    manifest = json.loads(sample_build.manifest.read_text())
    for o in manifest["outputs"]:
        if o["path"] == "validation/validation.fasta":
            o["sha256"] = "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(manifest))
    assert main(["validation", "--regenerate", str(bad), "--workdir", str(tmp_path / "r2")]) == 1
    assert "validation/validation.fasta: sha256 differs" in capsys.readouterr().err


def test_kill_mid_build_then_rerun_gives_same_bytes(
    sample_build: SampleBuild, tmp_path: Path
) -> None:
    config = sample_config(tmp_path)
    proc = snakemake(tmp_path, config, background=True)
    marker = tmp_path / "build" / "logs" / "cluster.mmseqs.log"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "build finished before it could be interrupted"
    time.sleep(1.0)  # MMseqs2 is running now
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "build" / "clusters.parquet").exists()
    # a killed Snakemake leaves its lock: the documented recovery is --unlock, then rerun
    assert snakemake(tmp_path, config, "--unlock").returncode == 0
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert outputs(tmp_path / "manifests" / "sample.json") == outputs(sample_build.manifest)
    leftovers = [p for p in (tmp_path / "build").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def copy_of_build(sample_build: SampleBuild, dest: Path, **changes: object) -> Path:
    """A copy of the sample build (times kept) and its config with ``section.key`` changes."""
    import yaml

    shutil.copytree(sample_build.root, dest, symlinks=True)
    cfg = yaml.safe_load(sample_build.config.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    config = dest / "sample.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def planned_jobs(root: Path, config: Path) -> set[str]:
    """The rules a Snakemake dry run would run."""
    result = snakemake(root, config, "--dry-run")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return set()
    table = text.split("Job stats:")[1].split("\n\n")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if len(line.split()) == 2} - {
        "total", "all"}


@pytest.mark.parametrize(("change", "expected"), [
    ({}, set()),
    ({"leakage__max_fraction": 0.5}, {"check_leakage", "manifest"}),
    ({"validation__size": 50}, {"validation", "manifest"}),
    ({"shards__max_shard_bytes": 100_000}, {"shards", "manifest"}),
    ({"split__valid_fraction": 0.12}, {"split", "check_leakage", "shards", "validation",
                                       "manifest"}),
    ({"ingest__row_group_rows": 1000}, {"ingest_part", "ingest", "cluster", "split",
                                        "check_leakage", "shards", "validation", "manifest"}),
], ids=["nothing", "leakage", "validation", "shards", "split", "ingest"])
def test_a_config_edit_reruns_only_what_it_affects(sample_build: SampleBuild, tmp_path: Path,
                                                   change: dict, expected: set) -> None:
    config = copy_of_build(sample_build, tmp_path / "b", **change)
    assert planned_jobs(tmp_path / "b", config) == expected


@pytest.mark.parametrize(("deleted", "expected"), [
    ("sequences.parquet", {"ingest_part", "ingest", "cluster", "split", "check_leakage",
                           "shards", "validation", "manifest"}),
    ("clusters.parquet", {"cluster", "split", "check_leakage", "shards", "validation",
                          "manifest"}),
    ("splits.parquet", {"split", "check_leakage", "shards", "validation", "manifest"}),
    ("shards", {"shards", "manifest"}),
])
def test_a_deleted_intermediate_reruns_its_stage_and_what_follows(
        sample_build: SampleBuild, tmp_path: Path, deleted: str, expected: set) -> None:
    config = copy_of_build(sample_build, tmp_path / "b")
    path = tmp_path / "b" / "build" / deleted
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert planned_jobs(tmp_path / "b", config) == expected


def test_decontamination_under_snakemake_reruns_only_from_its_stage(
        sample_build: SampleBuild, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A decontaminate set adds its stage between split and shards; editing the set reruns it,
    the shards and the manifest only; dropping it removes its outputs from the build."""
    import yaml

    root = tmp_path / "b"
    config = copy_of_build(sample_build, root)
    splits = pl.read_parquet(root / "build" / "splits.parquet")
    clusters = pl.read_parquet(root / "build" / "clusters.parquet")
    train_reps = (clusters.join(splits, on="rep50").filter(pl.col("split") == "train")
                  .filter(pl.col("rep50") == "UniRef50_" + pl.col("accession"))
                  .get_column("accession").sort().head(3).to_list())
    sequences = pl.read_parquet(root / "build" / "sequences.parquet",
                                columns=["accession", "sequence"])
    chosen = sequences.filter(pl.col("accession").is_in(train_reps))
    assert chosen.height == 3
    evaluation = tmp_path / "copies.fasta"
    evaluation.write_text("".join(f">EVAL_{a}\n{s}\n" for a, s in chosen.iter_rows()))
    cfg = yaml.safe_load(config.read_text())
    cfg["decontaminate"] = [{"name": "copies", "url": str(evaluation)}]
    config.write_text(yaml.safe_dump(cfg))
    assert planned_jobs(root, config) == {"decontaminate", "shards", "manifest"}
    result = snakemake(root, config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    manifest = root / "manifests" / "sample.json"
    paths = outputs(manifest)
    assert {"decontamination.parquet", "stats/decontamination.json"} <= set(paths)
    report = json.loads(manifest.read_text())["counts"]["decontamination"]
    assert report["sets"]["copies"]["sequences_with_hit"] == 3
    assert report["excluded"]["uniref50_clusters"] >= 3
    assert main(["stats", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert "decontaminate copies: 3 of 3 sequences hit train" in text
    assert main(["verify", str(manifest), "--out-dir", str(root / "build")]) == 0
    moved = set(pl.read_parquet(root / "build" / "decontamination.parquet").get_column("rep50"))
    in_train = {s.cluster for s in iter_clusters(shard_paths(root / "build" / "shards" / "train"))}
    assert {f"UniRef50_{a}" for a in train_reps} <= moved and not moved & in_train
    monkeypatch.setenv("ESM2_MANIFEST", str(manifest))
    monkeypatch.setenv("ESM2_BUILD_DIR", str(root / "build"))
    assert run_notebook("dataset_report.ipynb") == 5  # the report's decontamination figure

    evaluation.write_text(evaluation.read_text() + ">EVAL_NEW\nMKVLAAGG\n")  # edited in place
    assert planned_jobs(root, config) == {"decontaminate", "shards", "manifest"}
    cfg["decontaminate"][0]["identity"] = 0.9
    config.write_text(yaml.safe_dump(cfg))
    assert planned_jobs(root, config) == {"decontaminate", "shards", "manifest"}
    del cfg["decontaminate"]
    config.write_text(yaml.safe_dump(cfg))
    assert planned_jobs(root, config) == {"shards", "manifest"}
    result = snakemake(root, config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (root / "build" / "decontamination.parquet").exists()
    assert outputs(manifest) == outputs(sample_build.manifest)  # back to the sample's bytes
    assert main(["verify", str(manifest), "--out-dir", str(root / "build")]) == 0


def test_two_inputs_build_the_bytes_of_their_concatenation(
        sample_build: SampleBuild, tmp_path: Path) -> None:
    """Two input files ingest as two parallel jobs and a merge; every output equals the sample
    build's, whose one input is their concatenation (only the per-input counts differ)."""
    import yaml

    from tests.helpers import halves_of_sample

    a, b, _ = halves_of_sample(tmp_path)
    cfg = yaml.safe_load(sample_build.config.read_text())
    cfg["inputs"] = [{"url": str(a)}, {"url": str(b)}]
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "rule ingest_part" in result.stdout + result.stderr
    assert not (tmp_path / "build" / "ingest_parts").exists() or not any(
        (tmp_path / "build" / "ingest_parts").iterdir())  # temporary: gone after the merge
    two = outputs(tmp_path / "manifests" / "sample.json")
    one = outputs(sample_build.manifest)
    assert set(two) == set(one)
    differ = sorted(name for name in one if one[name] != two[name])
    assert differ == ["stats/ingest.json"]
    stats = [json.loads((root / "stats" / "ingest.json").read_text())
             for root in (sample_build.out, tmp_path / "build")]
    assert [i["records"] for i in stats[1]["inputs"]] != [] and \
        sum(i["records"] for i in stats[1]["inputs"]) == stats[0]["inputs"][0]["records"]
    assert {k: v for k, v in stats[0].items() if k != "inputs"} == \
        {k: v for k, v in stats[1].items() if k != "inputs"}


def test_dataset_report_notebook_runs(sample_build: SampleBuild, monkeypatch) -> None:
    monkeypatch.setenv("ESM2_MANIFEST", str(sample_build.manifest))
    monkeypatch.setenv("ESM2_BUILD_DIR", str(sample_build.out))
    assert run_notebook("dataset_report.ipynb") == 4


def test_alignment_links_join_clusters_into_split_groups(sample_build: SampleBuild) -> None:
    """cluster_links.parquet: pairs of different UniRef50 clusters the clustering aligned at
    >= 50%; link_method: alignments puts each pair in one split group, with no search."""
    from pipeline.build_dir import BuildDir
    from pipeline.config import SplitConfig
    from pipeline.linking import link_clusters

    out = sample_build.out
    links = pl.read_parquet(out / "cluster_links.parquet")
    reps = set(pl.read_parquet(out / "clusters.parquet").get_column("rep50"))
    assert links.height > 0
    assert (links.get_column("a") < links.get_column("b")).all()
    assert set(links.get_column("a")) | set(links.get_column("b")) <= reps
    assert links.get_column("identity").min() >= 0.5
    assert links.get_column("identity").max() <= 1.0
    groups, n = link_clusters(BuildDir(out), SplitConfig(link_method="alignments"), 1, None)
    assert n == links.height and groups.height == len(reps)
    group_of = dict(groups.iter_rows())
    assert all(group_of[a] == group_of[b] for a, b in links.select("a", "b").iter_rows())
    strict, n_strict = link_clusters(BuildDir(out), SplitConfig(link_method="alignments",
                                                      link_identity=0.9), 1, None)
    assert n_strict < n and strict.get_column("group").n_unique() > groups.get_column(
        "group").n_unique()


def test_a_failing_stage_is_one_line_in_its_log_and_in_snakemakes_report(
        tmp_path: Path) -> None:
    """A bad record under Snakemake: the rule's log ends in the stage's one-line error, which
    Snakemake's failure report repeats; nothing of the stage's outputs is written."""
    import yaml

    from tests.conftest import sample_config
    from tests.helpers import write_fasta

    bad = write_fasta(tmp_path / "bad.fasta", ">sp|P1|OK\nMKV\n>sp|P2|BAD\nMK1V\n")
    config = sample_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["inputs"] = [{"url": str(bad)}]
    config.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, config)
    assert result.returncode != 0
    log = (tmp_path / "build" / "logs" / "ingest-0.log").read_text().splitlines()
    expected = ("esm2-data: error: build/raw/bad.fasta: record P2 (line 3): "
                "invalid residue '1' at position 3")
    assert log[-1] == expected
    assert f"ingest_part failed: {expected}" in result.stdout + result.stderr
    assert not (tmp_path / "build" / "ingest_parts" / "0").exists()
    assert not (tmp_path / "build" / "sequences.parquet").exists()


def test_rule_logs_say_where_a_long_stage_stands(sample_build: SampleBuild) -> None:
    """Off a terminal, progress is log lines: records and residues for ingest, each MMseqs2
    module and cascade step for clustering, clusters and tar bytes for shards."""
    logs = sample_build.out / "logs"
    ingest = (logs / "ingest-0.log").read_text()
    assert re.search(r"ingest uniprot_sample\.fasta\.gz: done 4\.19k seq.* \[\d+(\.\d+)?k "
                     r"residues\]", ingest), ingest
    cluster = (logs / "cluster.log").read_text()
    for step in (1, 2, 3):
        assert f"MMseqs2 cluster: step {step} of 3, module" in cluster, cluster
    assert re.search(r"MMseqs2 cluster: \d+ modules in \d+ s", cluster)
    shards = (logs / "shards.log").read_text()
    assert re.search(r"shards: done 1,426/1,426 clusters \(100%\).*B of tar\]", shards), shards


def test_slurm_profile_sets_per_rule_resources_and_groups(tmp_path: Path) -> None:
    """profiles/slurm parses (without its SLURM executor, not installed here): each input's
    ingest job, the merge and MMseqs2 get their own resources; validation and manifest share
    one job."""
    import yaml

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile.pop("executor") == "slurm"
    local = tmp_path / "profile"
    local.mkdir()
    (local / "config.yaml").write_text(yaml.safe_dump(profile))
    config = sample_config(tmp_path)
    result = snakemake(tmp_path, config, "--dry-run", "--profile", str(local))
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-2000:]
    jobs = text.split("\nrule ")[1:]
    resources = {job.split(":")[0]: job for job in jobs}
    assert "mem_mb=16000" in resources["ingest_part"] and "cpus_per_task=4" in resources[
        "ingest_part"]
    assert "mem_mb=950000" in resources["cluster"] and "cpus_per_task=64" in resources[
        "cluster"]
    assert "Group job after-split" in text


def test_build_dir_names_each_path_and_the_stage_that_makes_it(tmp_path: Path) -> None:
    from pipeline.build_dir import BuildDir
    from pipeline.errors import PipelineError

    build = BuildDir(tmp_path)
    assert build.sequences == tmp_path / "sequences.parquet"
    assert build.split_shards("valid") == tmp_path / "shards" / "valid"
    assert BuildDir.split_rel("valid") == "shards/valid"
    assert build.stats("leakage") == tmp_path / "stats" / "leakage.json"
    assert build.ingest_part(1) == tmp_path / "ingest_parts" / "1"
    assert {p.relative_to(tmp_path).as_posix() for p in build.outputs()} >= {
        "raw/download.json", "clusters.parquet", "shards", "validation"}
    build.sequences.write_text("")
    with pytest.raises(PipelineError, match=r"clusters\.parquet: missing \(run 'esm2-data "
                                            r"cluster' first\)"):
        build.require(build.sequences, build.clusters)
    with pytest.raises(PipelineError, match=r"leakage\.json: missing \(run 'esm2-data "
                                            r"check-leakage' first\)"):
        build.require(build.stats("leakage"))
