from __future__ import annotations

import gzip
import re
from pathlib import Path

import polars as pl
import pytest

from pipeline.cli import main
from pipeline.errors import InputFormatError
from pipeline.ingest import ingest
from tests.helpers import SAMPLE_FASTA, halves_of_sample, shared_file, write_fasta

# Record and residue counts stated in ../shared/data/README.md
SHARED_COUNTS = {
    "mmseqs2_examples_query.fasta.gz": (500, 245_830),
    "mmseqs2_examples_db.fasta.gz": (20_000, 9_055_569),
    "openfold_msa_uniref90_hits.fasta.gz": (1_293, 88_437),
    "openfold_msa_uniprot_hits.fasta.gz": (2_692, 169_750),
}


@pytest.mark.parametrize("name", sorted(SHARED_COUNTS))
def test_shared_files_give_readme_counts(name: str, tmp_path: Path) -> None:
    path = shared_file(name)
    stats = ingest([path], tmp_path, chunk_bytes=1 << 18, bucket_bytes=1 << 20)
    records, residues = SHARED_COUNTS[name]
    assert stats["inputs"] == [{"file": name, "records": records, "residues": residues}]
    assert stats["records_kept"] == records and stats["records_rejected"] == 0
    assert stats["residues_kept"] == residues
    assert sum(stats["residue_counts"].values()) == residues
    assert sum(stats["length"]["histogram"]["counts"]) == records
    recs = pl.read_parquet(tmp_path / "records.parquet")
    assert recs.height == records and recs.get_column("accession").n_unique() == records


def test_exact_duplicates_collapse_as_readme_says(tmp_path: Path) -> None:
    path = shared_file("mmseqs2_examples_db.fasta.gz")
    stats = ingest([path], tmp_path, chunk_bytes=1 << 20, bucket_bytes=1 << 21)
    assert stats["unique_sequences"] == 18_801
    assert stats["duplicate_records_collapsed"] == 1_199
    seqs = pl.read_parquet(tmp_path / "sequences.parquet")
    assert seqs.get_column("sequence").n_unique() == 18_801
    assert seqs.get_column("n_records").sum() == 20_000
    assert seqs.filter(pl.col("n_records") > 1).height == 885
    assert seqs.get_column("seq_hash").is_sorted()
    assert set(seqs.get_column("db").unique()) == {"sp", "tr"}
    assert seqs.get_column("taxid").null_count() == seqs.height  # 2016 headers: no OX=
    assert seqs.get_column("length").min() == 7 and seqs.get_column("length").max() == 8081


def test_uniref_headers(tmp_path: Path) -> None:
    path = shared_file("openfold_msa_uniref90_hits.fasta.gz")
    ingest([path], tmp_path)
    seqs = pl.read_parquet(tmp_path / "sequences.parquet")
    row = seqs.filter(pl.col("accession") == "A0A087Y697").row(0, named=True)
    assert row["db"] == "UniRef90"
    assert row["description"] == "ATP synthase F1 subunit epsilon"
    assert row["taxid"] == 1489872
    assert seqs.filter(pl.col("accession").str.starts_with("UPI")).height > 0


def test_header_styles_cleaning_and_dedup(tmp_path: Path) -> None:
    fasta = write_fasta(tmp_path / "in.fa", (
        "\n>tr|Q00001|Q00001_MOUSE Some protein OS=Mus musculus OX=10090 GN=Abc PE=2 SV=1 \r\n"
        "mkv\r\nlaa*\r\n"
        ">sp|P00001|P1_HUMAN Same sequence, reviewed OS=Homo sapiens OX=9606 PE=1 SV=3\n"
        "MKVLAA\n\n"
        ">plain_id free text description\nACDEFGHIKLMNPQRSTVWYXBUZO\n"
    ))
    stats = ingest([fasta], tmp_path / "out")
    seqs = pl.read_parquet(tmp_path / "out" / "sequences.parquet")
    recs = pl.read_parquet(tmp_path / "out" / "records.parquet")
    assert stats["records_kept"] == 3 and stats["unique_sequences"] == 2
    kv = seqs.filter(pl.col("sequence") == "MKVLAA").row(0, named=True)
    assert kv["accession"] == "P00001"  # Swiss-Prot wins the duplicate group
    assert kv["n_records"] == 2 and kv["taxid"] == 9606 and kv["length"] == 6
    assert kv["description"] == "Same sequence, reviewed"
    mapping = dict(recs.select("accession", "rep_accession").iter_rows())
    assert mapping == {"Q00001": "P00001", "P00001": "P00001", "plain_id": "plain_id"}
    plain = seqs.filter(pl.col("accession") == "plain_id").row(0, named=True)
    assert plain["db"] == "" and plain["description"] == "free text description"
    assert plain["taxid"] is None
    assert stats["residue_counts"]["O"] == 1 and stats["residue_counts"]["K"] == 3


BAD_INPUTS = {
    "invalid_residue": (">sp|P1|A OS=x\nMKV\n>sp|P2|B OS=x\nMKJV\n",
                        r"bad\.fa: record P2 \(line 3\): invalid residue 'J' at position 3"),
    "empty_record": (">sp|P1|A OS=x\nMKV\n>sp|P2|B OS=x\n>sp|P3|C\nMK\n",
                     r"bad\.fa: record P2 \(line 3\): empty sequence"),
    "duplicate_accession": (">sp|P1|A\nMKV\n>tr|P2|B\nMKW\n>tr|P1|C\nMKY\n",
                            r"bad\.fa: record P1 \(line 5\): duplicate accession "
                            r"\(first seen in bad\.fa at line 1\)"),
    "not_fasta": ("accession\tsequence\nP1\tMKV\n",
                  r"bad\.fa: line 1: not a FASTA file"),
    "empty_file": ("\n\n", r"bad\.fa: empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_no_output(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, pattern = BAD_INPUTS[case]
    bad = write_fasta(tmp_path / "bad.fa", text)
    out = tmp_path / "out"
    assert main(["ingest", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("esm2-data: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    leftovers = list(out.rglob("*")) if out.exists() else []
    assert leftovers == [], leftovers


def test_truncated_gzip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = gzip.compress(b">sp|P1|A\n" + b"MKV" * 50_000 + b"\n")
    bad = tmp_path / "cut.fa.gz"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert main(["ingest", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cut.fa.gz: truncated gzip stream" in err
    assert not out.exists() or list(out.rglob("*")) == []


def test_binary_file_is_not_fasta(tmp_path: Path) -> None:
    bad = tmp_path / "image.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(InputFormatError, match=r"image\.png: line 1: not a FASTA file"):
        ingest([bad], tmp_path / "out")


def test_skip_mode_counts_rejections(tmp_path: Path) -> None:
    text = "".join(v[0] for k, v in BAD_INPUTS.items() if k not in ("not_fasta", "empty_file"))
    bad = write_fasta(tmp_path / "mixed.fa.gz", text)
    stats = ingest([bad], tmp_path / "out", on_error="skip")
    assert stats["rejected_by_reason"] == {
        "duplicate_accession": 3, "empty_sequence": 1, "invalid_residue": 1,
    }
    recs = pl.read_parquet(tmp_path / "out" / "records.parquet")
    assert sorted(recs.get_column("accession")) == ["P1", "P2", "P3"]
    assert stats["records_read"] == stats["records_kept"] + stats["records_rejected"]
    assert all("mixed.fa.gz: record" in m for m in stats["rejected_examples"])


def test_duplicate_accession_across_files(tmp_path: Path) -> None:
    a = write_fasta(tmp_path / "a.fa", ">sp|P1|A\nMKV\n")
    b = write_fasta(tmp_path / "b.fa", ">tr|X9|B\nMKW\n>tr|P1|C\nMKY\n")
    with pytest.raises(InputFormatError, match=r"b\.fa: record P1 \(line 3\).*first seen in a\.fa"):
        ingest([a, b], tmp_path / "out")


def test_output_independent_of_chunk_and_partition_sizes(tmp_path: Path) -> None:
    small = ingest([SAMPLE_FASTA], tmp_path / "s", chunk_bytes=1 << 12, bucket_bytes=1 << 16,
                   row_group_rows=1000)
    large = ingest([SAMPLE_FASTA], tmp_path / "l", chunk_bytes=1 << 24, bucket_bytes=1 << 30,
                   row_group_rows=1000)
    assert small == large
    for name in ("sequences.parquet", "records.parquet", "stats/ingest.json"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "l" / name).read_bytes(), name
    assert pq_row_groups(tmp_path / "s" / "sequences.parquet") == [1000, 1000, 887]


def pq_row_groups(path: Path) -> list[int]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def test_sample_ingest_counts(tmp_path: Path) -> None:
    stats = ingest([SAMPLE_FASTA], tmp_path)
    assert stats["records_kept"] == 4192 and stats["unique_sequences"] == 2887
    seqs = pl.read_parquet(tmp_path / "sequences.parquet")
    assert seqs.columns == ["accession", "db", "description", "taxid", "length", "sequence",
                            "seq_hash", "n_records"]


@pytest.mark.parametrize("bucket_bytes", [1 << 30, 1 << 16], ids=["one-partition", "many"])
def test_parts_then_merge_equal_one_ingest_of_the_concatenation(
        tmp_path: Path, bucket_bytes: int) -> None:
    from pipeline.ingest import ingest_part, merge_parts

    a, b, both = halves_of_sample(tmp_path)
    whole = ingest([both], tmp_path / "whole", bucket_bytes=bucket_bytes, row_group_rows=1000)
    inputs = [a, b]
    parts = [tmp_path / "parts" / str(i) for i in range(2)]
    for i in (1, 0):  # any order: the jobs run side by side
        info = ingest_part(inputs, i, parts[i], bucket_bytes=bucket_bytes)
        assert info["index"] == i and info["input"]["file"] == inputs[i].name
    merged = merge_parts(inputs, parts, tmp_path / "merged", row_group_rows=1000)
    for name in ("sequences.parquet", "records.parquet"):
        assert (tmp_path / "merged" / name).read_bytes() == \
            (tmp_path / "whole" / name).read_bytes(), name
    assert [i["records"] for i in merged["inputs"]] == [
        gzip.decompress(p.read_bytes()).count(b">") for p in inputs]
    assert {k: v for k, v in merged.items() if k != "inputs"} == \
        {k: v for k, v in whole.items() if k != "inputs"}
    assert merged["records_kept"] == 4192 and merged["unique_sequences"] == 2887


def test_merge_finds_duplicate_accessions_across_parts(tmp_path: Path) -> None:
    from pipeline.ingest import ingest_part, merge_parts

    a = write_fasta(tmp_path / "a.fa", ">sp|P1|A\nMKV\n")
    b = write_fasta(tmp_path / "b.fa", ">tr|X9|B\nMKW\n>tr|P1|C\nMKY\n")
    parts = [tmp_path / "p0", tmp_path / "p1"]
    for i in range(2):
        ingest_part([a, b], i, parts[i])
    with pytest.raises(InputFormatError, match=r"b\.fa: record P1 \(line 3\).*first seen in a\.fa"):
        merge_parts([a, b], parts, tmp_path / "out")
    assert not (tmp_path / "out" / "sequences.parquet").exists()
    stats = merge_parts([a, b], parts, tmp_path / "out", on_error="skip")
    assert stats["rejected_by_reason"] == {"duplicate_accession": 1}


def test_bad_parts_are_clear_errors(tmp_path: Path) -> None:
    from pipeline.ingest import ingest_part, merge_parts

    a = write_fasta(tmp_path / "a.fa", ">sp|P1|A\nMKV\n")
    b = write_fasta(tmp_path / "b.fa", ">tr|X9|B\nMK1\n")
    with pytest.raises(InputFormatError, match="ingest part 2: the build has 2 inputs"):
        ingest_part([a, b], 2, tmp_path / "p2")
    with pytest.raises(InputFormatError, match=r"b\.fa: record X9 \(line 1\): invalid residue"):
        ingest_part([a, b], 1, tmp_path / "p1")
    assert not (tmp_path / "p1").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    ingest_part([a, b], 0, tmp_path / "p0")
    with pytest.raises(InputFormatError, match=r"p1/part\.json: missing \(run 'esm2-data "
                                               r"ingest --part 1'\)"):
        merge_parts([a, b], [tmp_path / "p0", tmp_path / "p1"], tmp_path / "out")
    with pytest.raises(InputFormatError, match="not from input 1"):
        merge_parts([a, b], [tmp_path / "p0", tmp_path / "p0"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_ingest_command_starts_parsing_before_the_heavy_imports(tmp_path: Path) -> None:
    """`esm2-data ingest FILE --out DIR` loads neither the config validators (pydantic) nor
    Arrow's compute functions before the parse starts (they load on a thread as it runs), and
    never Polars (0.2 CPU-s) or pandas (pyarrow's numpy conversions, and its comparisons with a
    Python string, would: 0.2 s, in a parse worker or the collapse), with repeated sequences
    and accessions in the input; the run still gives the outputs."""
    import os
    import subprocess
    import sys

    fasta = write_fasta(tmp_path / "in.fasta",
                        ">tr|Q2|B_HUMAN b OX=9606\nMKVL\n>sp|P1|A_HUMAN a OX=9606\nMKV\n"
                        ">tr|Q3|C_HUMAN c OX=9606\nMKV\n>tr|Q2|B_HUMAN again\nMKVLL\n")
    late = "('pydantic', 'pyarrow.compute', 'tqdm')"
    probe = (
        "import sys\n"
        "import pipeline.cli, pipeline.ingest\n"
        f"late = [m for m in {late} if m in sys.modules]\n"
        "assert not late, late\n"
        f"code = pipeline.cli.main(['ingest', {str(fasta)!r}, '--out', {str(tmp_path / 'o')!r},"
        " '--on-error', 'skip'])\n"
        "never = [m for m in ('pandas', 'polars') if m in sys.modules]\n"
        "assert not never, never\n"
        "sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "ESM2_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr
    assert "ingested 3 records (1 rejected) -> 2 unique sequences" in done.stdout
    assert pl.read_parquet(tmp_path / "o" / "sequences.parquet").height == 2
