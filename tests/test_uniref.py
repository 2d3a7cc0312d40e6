"""pipeline.uniref: UniProt's UniRef50 XML read as a stream into (rep50, rep90, entries)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline.errors import InputFormatError
from pipeline.uniref import iter_entries, read_membership
from tests.helpers import REPO, shared_file

HEAD = ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n<UniRef50 xmlns="http://uniprot.org/uniref" '
        'releaseDate="2024-03-27" version="2024_02">\n')


def member(tag: str, kind: str, ident: str, rep90: str | None, acc: str = "") -> str:
    props = f'<property type="UniProtKB accession" value="{acc}"/>' if acc else ""
    if rep90:
        props += f'<property type="UniRef90 ID" value="{rep90}"/>'
    seq = '<sequence length="3">MKV</sequence>' if tag == "representativeMember" else ""
    return f'<{tag}><dbReference type="{kind}" id="{ident}">{props}</dbReference>{seq}</{tag}>\n'


def entry(ident: str, *members: str) -> str:
    return (f'<entry id="{ident}" updated="2024-01-24">\n<name>Cluster: x</name>\n'
            f'<property type="member count" value="{len(members)}"/>\n{"".join(members)}</entry>\n')


GOOD = HEAD + entry(
    "UniRef50_P1",
    member("representativeMember", "UniProtKB ID", "A_HUMAN", "UniRef90_P1", "P1"),
    member("member", "UniProtKB ID", "B_HUMAN", "UniRef90_P1", "P2"),
    member("member", "UniParc ID", "UPI0000000001", "UniRef90_P1"),
    member("member", "UniProtKB ID", "C_MOUSE", "UniRef90_Q9", "Q9"),
) + entry(
    "UniRef50_R5",
    member("representativeMember", "UniParc ID", "UPI0000000002", "UniRef90_UPI0000000002"),
) + "</UniRef50>\n"


def write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode("latin-1")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_membership_counts_uniprot_members_per_uniref90(tmp_path: Path, gz: bool) -> None:
    xml = write(tmp_path / ("u.xml.gz" if gz else "u.xml"), GOOD, gz)
    entries = list(iter_entries(xml))
    assert [(e.id, e.uniref90) for e in entries] == [
        ("UniRef50_P1", {"UniRef90_P1": 2, "UniRef90_Q9": 1}),
        ("UniRef50_R5", {"UniRef90_UPI0000000002": 0}),  # a UniParc-only cluster
    ]
    stats = read_membership(xml, tmp_path / "m.parquet", chunk_rows=1, bucket_bytes=64)
    assert stats == {"uniref50_entries": 2, "uniref90_clusters": 3, "uniprot_members": 3}
    assert pl.read_parquet(tmp_path / "m.parquet").rows() == [
        ("UniRef50_P1", "UniRef90_P1", 2), ("UniRef50_P1", "UniRef90_Q9", 1),
        ("UniRef50_R5", "UniRef90_UPI0000000002", 0)]


@pytest.mark.parametrize(("text", "message"), [
    (HEAD + entry("UniRef50_E") + "</UniRef50>\n", r"entry UniRef50_E \(line 3\): no members"),
    (HEAD + entry("UniRef50_P1", member("member", "UniProtKB ID", "X_Y", None, "P7"))
     + "</UniRef50>\n", r"entry UniRef50_P1 \(line 3\): member X_Y \(line 6\) has no UniRef90"),
    (GOOD[: GOOD.index('<entry id="UniRef50_R5"') + 60], r"truncated or malformed XML after "
     r"entry UniRef50_P1: .*line 12"),
    (GOOD.replace("</UniRef50>\n", ""), r"truncated or malformed XML"),
    (HEAD + entry("UniRef50_A", member("member", "UniProtKB ID", "X", "UniRef90_X", "X"))
     + entry("UniRef50_B", member("member", "UniProtKB ID", "Y", "UniRef90_X", "Y"))
     + "</UniRef50>\n", r"UniRef90_X is a member of UniRef50_A and of UniRef50_B"),
], ids=["no-members", "no-uniref90", "truncated-entry", "no-root-end", "uniref90-twice"])
def test_bad_xml_is_one_line_and_nothing_written(tmp_path: Path, text: str,
                                                 message: str) -> None:
    xml = write(tmp_path / "bad.xml", text)
    with pytest.raises(InputFormatError, match=message) as err:
        read_membership(xml, tmp_path / "m.parquet")
    assert "\n" not in str(err.value) and str(xml) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.xml"]


def test_truncated_gzip_is_one_line(tmp_path: Path) -> None:
    data = gzip.compress((HEAD + entry("UniRef50_P1", member(
        "member", "UniProtKB ID", "A", "UniRef90_A", "A")) * 200 + "</UniRef50>").encode(),
        mtime=0)
    xml = tmp_path / "cut.xml.gz"
    xml.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFormatError, match=r"cut\.xml\.gz: truncated"):
        list(iter_entries(xml))


def test_a_huge_entry_streams(tmp_path: Path) -> None:
    """An entry of 50,000 members: read member by member, counted right."""
    members = "".join(member("member", "UniProtKB ID", f"M{i}", f"UniRef90_M{i % 7}", f"M{i}")
                      for i in range(50_000))
    xml = write(tmp_path / "big.xml.gz", HEAD + entry("UniRef50_BIG", members) + "</UniRef50>",
                gz=True)
    (only,) = iter_entries(xml)
    assert sum(only.uniref90.values()) == 50_000 and len(only.uniref90) == 7


@pytest.mark.heavy
def test_a_release_made_from_real_records_reads_back_exactly(tmp_path: Path) -> None:
    """scripts/make_uniref_release.py writes UniProt's formats from real records clustered by
    this project; reading the XML gives back exactly the membership it wrote; the release's
    bytes are the same on a second run."""
    source = shared_file("openfold_msa_uniprot_hits.fasta.gz")
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_uniref_release.py"),
                        str(tmp_path / out), str(source)], check=True, capture_output=True)
    for name in ("uniref50.xml.gz", "uniref90.fasta.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    read_membership(tmp_path / "a" / "uniref50.xml.gz", tmp_path / "got.parquet")
    got = pl.read_parquet(tmp_path / "got.parquet").sort("rep50", "rep90")
    expected = pl.read_parquet(tmp_path / "a" / "membership.parquet")
    assert got.equals(expected)
    assert got.get_column("uniprot_entries").sum() < 2_692  # some members are UniParc ones
    assert got.get_column("rep50").n_unique() > 100


def uniref_build(release: Path, out: Path, on_error: str = "fail") -> Path:
    """A build config of cluster.source uniref over a release made by the maker script."""
    import yaml

    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({
        "build": out.name, "out_dir": str(out), "manifest_dir": str(out.parent / "manifests"),
        "inputs": [{"url": str(release / "uniref50.xml.gz"), "role": "uniref50_xml"},
                   {"url": str(release / "uniref90.fasta.gz")}],
        "ingest": {"on_error": on_error},
        "cluster": {"source": "uniref"},
        "split": {"valid_fraction": 0.1, "test_fraction": 0.1, "link_method": "alignments"},
        "leakage": {"max_fraction": 1.0},
        "validation": {"size": 50},
    }))
    return config


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = shared_file("openfold_msa_uniprot_hits.fasta.gz")
    out = tmp_path_factory.mktemp("release")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_uniref_release.py"), str(out),
                    str(source)], check=True, capture_output=True)
    return out


@pytest.mark.heavy
def test_a_uniref_build_makes_each_uniref50_entry_one_sample(release: Path,
                                                              tmp_path: Path) -> None:
    """cluster.source uniref: the build's clusters are the XML's membership exactly; every
    UniRef50 entry is one sample in exactly one split, with UniProt's entry counts; the shards
    read back through the contract's reader; a rebuild gives the same bytes."""
    from pipeline.cli import main
    from pipeline.shard_reader import ShardReader, SplitIndex

    manifests = []
    for name in ("one", "two"):
        config = uniref_build(release, tmp_path / name)
        for stage in ("download", "ingest", "cluster", "split", "check-leakage", "shards",
                      "validation", "manifest"):
            assert main([stage, "--config", str(config)]) == 0, stage
        manifests.append(json.loads((tmp_path / "manifests" / f"{name}.json").read_text()))
    out = tmp_path / "one"
    expected = pl.read_parquet(release / "membership.parquet")
    clusters = pl.read_parquet(out / "clusters.parquet")
    assert clusters.select("rep50", "rep90", "uniprot_entries").sort("rep50", "rep90").equals(
        expected)
    seen: dict[str, str] = {}
    for split in ("train", "valid", "test"):
        index = SplitIndex(out / "shards" / split)
        reader = ShardReader(index)
        for i in range(len(index)):
            sample = reader.read(i)
            assert sample.cluster not in seen
            seen[sample.cluster] = split
            rows = expected.filter(pl.col("rep50") == sample.cluster)
            assert sorted(sample.members) == sorted(rows.get_column("rep90"))
            assert sample.uniprot_entries == rows.get_column("uniprot_entries").sum()
    assert set(seen) == set(expected.get_column("rep50"))
    assert len(set(seen.values())) == 3
    one, two = ({o["path"]: o["sha256"] for o in m["outputs"]} for m in manifests)
    assert one == two
    stats = json.loads((out / "stats" / "cluster.json").read_text())
    assert stats["source"] == "uniref" and stats["skipped"] == {}
    assert main(["verify", str(tmp_path / "manifests" / "one.json")]) == 0
    # BioNeMo's table of a split: one row per UniRef90 cluster of the split's UniRef50 clusters
    table = tmp_path / "train.parquet"
    assert main(["export-table", "--config", str(tmp_path / "one.yaml"), "--split", "train",
                 "--out", str(table)]) == 0
    rows = pl.read_parquet(table)
    assert rows.columns == ["ur50_id", "ur90_id", "sequence"]
    train = {c for c, s in seen.items() if s == "train"}
    assert set(rows.get_column("ur50_id")) == train
    assert rows.height == expected.filter(pl.col("rep50").is_in(list(train))).height
    fasta = dict(line.split("\n", 1) for line in gzip.decompress(
        (release / "uniref90.fasta.gz").read_bytes()).decode().lstrip(">").split("\n>"))
    by_id = {head.split()[0]: seq.replace("\n", "") for head, seq in fasta.items()}
    assert all(by_id[u] == q for u, q in rows.select("ur90_id", "sequence").iter_rows())


@pytest.mark.heavy
def test_uniref_consistency_errors_fail_or_are_counted(release: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A UniRef90 cluster of the XML without a FASTA record: one line naming the entry (the
    default), or counted in stats/cluster.json and left out (ingest.on_error: skip)."""
    from pipeline.cli import main

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "uniref50.xml.gz").write_bytes((release / "uniref50.xml.gz").read_bytes())
    text = gzip.decompress((release / "uniref90.fasta.gz").read_bytes()).decode()
    records = text.split("\n>")
    dropped = records[5].split()[0]
    extra = "UniRef90_X0STRAY stray n=1 RepID=X0STRAY\nMKVLAAGIVALLLAAGCSS"
    (cut / "uniref90.fasta.gz").write_bytes(gzip.compress(
        "\n>".join(records[:5] + records[6:] + [extra]).encode(), mtime=0))
    config = uniref_build(cut, tmp_path / "strict")
    for stage in ("download", "ingest"):
        assert main([stage, "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["cluster", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esm2-data: error: ")
    assert f"{dropped} has no record in the UniRef90 FASTA (1 such)" in err[0]
    assert not (tmp_path / "strict" / "clusters.parquet").exists()
    config = uniref_build(cut, tmp_path / "lenient", on_error="skip")
    for stage in ("download", "ingest", "cluster"):
        assert main([stage, "--config", str(config)]) == 0
    stats = json.loads((tmp_path / "lenient" / "stats" / "cluster.json").read_text())
    assert stats["skipped"] == {"uniref90_without_record": 1, "records_in_no_uniref50": 1}
    clusters = pl.read_parquet(tmp_path / "lenient" / "clusters.parquet")
    assert not {dropped, "UniRef90_X0STRAY"} & set(clusters.get_column("rep90"))
    # every cluster's record, and one more that no UniRef50 entry lists
    (cut / "uniref90.fasta.gz").write_bytes(gzip.compress(
        "\n>".join([*records, extra]).encode(), mtime=0))
    config = uniref_build(cut, tmp_path / "stray")
    for stage in ("download", "ingest"):
        assert main([stage, "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["cluster", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert "record X0STRAY (UniRef90_X0STRAY) is in no UniRef50 entry" in err


# 256 bytes: ~40 partitions written at once; 16 bytes: ~640 planned, more than
# partition.MAX_FANOUT, so each written partition is split on disk before the check
@pytest.mark.parametrize("bucket_bytes", [256, 16], ids=["fanout", "split-on-disk"])
def test_a_uniref90_in_two_entries_is_found_across_partitions(tmp_path: Path,
                                                              bucket_bytes: int) -> None:
    entries = [entry(f"UniRef50_E{i}", member("member", "UniProtKB ID", f"M{i}",
                                               f"UniRef90_M{i}", f"M{i}")) for i in range(40)]
    entries.append(entry("UniRef50_Z", member("member", "UniProtKB ID", "M7", "UniRef90_M7",
                                              "M7")))
    xml = write(tmp_path / "twice.xml", HEAD + "".join(entries) + "</UniRef50>\n")
    with pytest.raises(InputFormatError, match="UniRef90_M7 is a member of UniRef50_E7 and of "
                                               "UniRef50_Z"):
        read_membership(xml, tmp_path / "m.parquet", chunk_rows=3, bucket_bytes=bucket_bytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twice.xml"]
    good = write(tmp_path / "once.xml", HEAD + "".join(entries[:-1]) + "</UniRef50>\n")
    stats = read_membership(good, tmp_path / "m.parquet", chunk_rows=3, bucket_bytes=bucket_bytes)
    assert stats == {"uniref50_entries": 40, "uniref90_clusters": 40, "uniprot_members": 40}
