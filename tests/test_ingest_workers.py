"""Parallel chunk parsing: any number and kind of workers gives the bytes, the errors and the
rejection examples of a one-worker ingest."""

from __future__ import annotations

import gzip
import hashlib
import random
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.errors import InputFormatError
from pipeline.ingest import ingest, ingest_part, merge_parts
from pipeline.ingest_chunks import seq_keys
from tests.helpers import SAMPLE_FASTA, halves_of_sample, write_fasta

OUTPUTS = ("sequences.parquet", "records.parquet", "stats/ingest.json")
CHUNK = 1 << 14  # the sample is ~60 chunks: every worker gets many


def outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("bucket_bytes", [1 << 30, 1 << 16], ids=["in-memory", "partitions"])
def test_workers_write_the_bytes_of_one_worker(tmp_path: Path, kind: str,
                                               bucket_bytes: int) -> None:
    one = ingest([SAMPLE_FASTA], tmp_path / "one", chunk_bytes=CHUNK, bucket_bytes=bucket_bytes,
                 row_group_rows=1000, workers=1)
    many = ingest([SAMPLE_FASTA], tmp_path / "many", chunk_bytes=CHUNK,
                  bucket_bytes=bucket_bytes, row_group_rows=1000, workers=3, worker_kind=kind)
    assert many == one and one["records_kept"] == 4192 and one["unique_sequences"] == 2887
    assert outputs(tmp_path / "many") == outputs(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [
        "records.parquet", "sequences.parquet", "stats"]  # no scratch left


def test_partition_keys_are_the_first_48_bits_of_the_md5() -> None:
    hashes = [hashlib.md5(str(i).encode()).hexdigest() for i in range(1000)]
    column = pa.chunked_array([pa.array(hashes[:300], pa.large_string()),
                               pa.array(["x", *hashes[300:]], pa.large_string()).slice(1)])
    keys = seq_keys(pa.table({"seq_hash": column}))
    assert keys.tolist() == [int(h[:12], 16) for h in hashes]


def _records(n: int, bad: dict[int, str]) -> str:
    """``n`` records of 300 random residues; record i's sequence is ``bad[i]`` where given."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        seq = "".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=300))
        seq = bad.get(i, seq)
        out.append(f">sp|P{i:05d}|E{i}_HUMAN Entry {i} OS=Homo sapiens OX=9606\n{seq}\n")
    return "".join(out)


@pytest.mark.parametrize("workers", [1, 2])
def test_headers_without_an_identifier_are_reported_in_file_order(tmp_path: Path,
                                                                  workers: int) -> None:
    """Rows reach the partitions grouped by their sequence's hash: the records rejected while
    they are gathered in that order are still reported in the order of the file."""
    text = _records(200, {})
    lines = text.splitlines(keepends=True)
    for i in (20, 5, 13, 170):  # all but the last in the first chunk, in different partitions
        lines[2 * i] = f">  Nameless {i}\n"
    fasta = write_fasta(tmp_path / "nameless.fa", "".join(lines))
    with pytest.raises(InputFormatError, match=r"nameless.fa: record Nameless \(line 11\): "
                                               r"header has no identifier"):
        ingest([fasta], tmp_path / "fail", chunk_bytes=CHUNK, bucket_bytes=1 << 12,
               workers=workers)
    stats = ingest([fasta], tmp_path / "skip", on_error="skip", chunk_bytes=CHUNK,
                   bucket_bytes=1 << 12, workers=workers)
    assert stats["rejected_by_reason"] == {"empty_header": 4} and stats["records_kept"] == 196
    assert [m.split("(line ")[1].split(")")[0] for m in stats["rejected_examples"]] == [
        "11", "27", "41", "341"]


def test_scratch_partitions_are_deleted_as_they_are_read(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk the partitions take is freed as the collapse goes, not all at the end."""
    import pipeline.partition as partition

    seen: list[tuple[bool, bool]] = []  # per partition read: (its files gone, the last's there)

    def watching(parts, *args, **kwargs):
        files = [f for f in parts if f]
        for i, table in enumerate(partition.iter_split(parts, *args, **kwargs)):
            seen.append((not any(p.exists() for p in files[i]),
                         all(p.exists() for p in files[-1]) or i == len(files) - 1))
            yield table

    monkeypatch.setattr("pipeline.ingest.iter_split", watching)
    ingest([SAMPLE_FASTA], tmp_path / "out", chunk_bytes=CHUNK, bucket_bytes=1 << 16, workers=2)
    assert len(seen) > 2 * 4 and all(gone and last_there for gone, last_there in seen)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_the_first_bad_record_in_the_file_is_reported(tmp_path: Path, kind: str) -> None:
    bad = {700: "MKV1", 150: "MKVJ", 400: ""}
    fasta = write_fasta(tmp_path / "bad.fa", _records(1000, bad))
    with pytest.raises(InputFormatError) as one:
        ingest([fasta], tmp_path / "one", chunk_bytes=CHUNK, workers=1)
    with pytest.raises(InputFormatError) as many:
        ingest([fasta], tmp_path / "many", chunk_bytes=CHUNK, workers=2, worker_kind=kind)
    assert str(many.value) == str(one.value)
    assert "bad.fa: record P00150 (line 301): invalid residue 'J' at position 4" in str(one.value)
    assert not (tmp_path / "many").exists() or list((tmp_path / "many").rglob("*")) == []

    skip_one = ingest([fasta], tmp_path / "s1", chunk_bytes=CHUNK, workers=1, on_error="skip")
    skip_many = ingest([fasta], tmp_path / "s2", chunk_bytes=CHUNK, workers=2, worker_kind=kind,
                       on_error="skip")
    assert skip_many == skip_one
    assert skip_one["rejected_by_reason"] == {"empty_sequence": 1, "invalid_residue": 2}
    assert [m.split(": record ")[1][:6] for m in skip_one["rejected_examples"]] == [
        "P00150", "P00400", "P00700"]


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_truncated_gzip_after_a_bad_record_reports_the_record(tmp_path: Path,
                                                                kind: str) -> None:
    text = _records(2000, {30: "MK*V"})
    data = gzip.compress(text.encode(), mtime=0)
    cut = tmp_path / "cut.fa.gz"
    cut.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(InputFormatError, match=r"record P00030 \(line 61\): invalid residue '\*'"):
        ingest([cut], tmp_path / "a", chunk_bytes=CHUNK, workers=2, worker_kind=kind)
    clean = gzip.compress(_records(2000, {}).encode(), mtime=0)
    cut.write_bytes(clean[: len(clean) * 3 // 4])
    with pytest.raises(InputFormatError, match=r"cut\.fa\.gz: truncated gzip stream"):
        ingest([cut], tmp_path / "b", chunk_bytes=CHUNK, workers=2, worker_kind=kind)
    for out in (tmp_path / "a", tmp_path / "b"):
        assert not out.exists() or list(out.rglob("*")) == []  # nothing half-written


def test_parts_parsed_by_workers_merge_to_the_bytes_of_one_ingest(tmp_path: Path) -> None:
    a, b, both = halves_of_sample(tmp_path)
    ingest([both], tmp_path / "whole", bucket_bytes=1 << 16, row_group_rows=1000, workers=1)
    parts = [tmp_path / "parts" / str(i) for i in range(2)]
    for i in range(2):
        ingest_part([a, b], i, parts[i], chunk_bytes=CHUNK, bucket_bytes=1 << 16, workers=2)
        assert len(list(parts[i].glob("w*/seq-*.arrows"))) > 2  # both workers wrote
    merge_parts([a, b], parts, tmp_path / "merged", row_group_rows=1000)
    for name in OUTPUTS[:2]:
        assert (tmp_path / "merged" / name).read_bytes() == \
            (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize("fasta_of", ["sample", "duplicates"])
def test_partitions_beyond_the_fanout_split_on_disk_to_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fasta_of: str) -> None:
    """A plan for more partitions than are written at once (MAX_FANOUT) splits each written
    partition on disk: the outputs, errors and skips are those of an unsplit ingest."""
    import pipeline.partition as partition

    fasta = SAMPLE_FASTA
    if fasta_of == "duplicates":  # the same accession twice, far apart, and repeated sequences
        text = _records(3000, {})
        fasta = write_fasta(tmp_path / "dups.fa", text + text.split(">")[1].join([">", ""]))
    kwargs = {"chunk_bytes": CHUNK, "bucket_bytes": 1 << 14, "row_group_rows": 1000,
              "workers": 2, "worker_kind": "thread"}
    plain = tmp_path / "plain"
    if fasta_of == "duplicates":
        with pytest.raises(InputFormatError) as whole:
            ingest([fasta], plain, **kwargs)
        ingest([fasta], plain, on_error="skip", **kwargs)
    else:
        ingest([fasta], plain, **kwargs)
    monkeypatch.setattr(partition, "MAX_FANOUT", 3)
    written: list[int] = []
    real_iter_split = partition.iter_split

    def counting(parts, planned, key, scratch, batch_rows=1 << 16, consume=False):
        written.append(len(parts))
        assert partition.split_factor(planned) > 1  # this ingest does split
        assert consume  # scratch partitions: deleted as they are read
        yield from real_iter_split(parts, planned, key, scratch, batch_rows=97, consume=True)
        assert not any(p.exists() for files in parts if files for p in files)

    monkeypatch.setattr("pipeline.ingest.iter_split", counting)
    split = tmp_path / "split"
    if fasta_of == "duplicates":
        with pytest.raises(InputFormatError) as pieces:
            ingest([fasta], split, **kwargs)
        assert str(pieces.value) == str(whole.value)
        assert "duplicate accession (first seen in dups.fa at line 1)" in str(whole.value)
        ingest([fasta], split, on_error="skip", **kwargs)
    else:
        ingest([fasta], split, **kwargs)
    assert written and set(written) == {3}
    assert outputs(split) == outputs(plain)


def test_a_duplicate_accession_stops_the_collapse_running_beside_its_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``on_error`` fail, the duplicate-accession check runs beside the collapse (here
    made slow, the collapse of each partition too): its error (a one-thread run's) is raised
    as soon as it is seen, and no output is kept."""
    import time

    import pipeline.ingest as ingest_module

    text = _records(3000, {})
    fasta = write_fasta(tmp_path / "dups.fa", text + text.split(">")[1].join([">", ""]))
    real_collapse, real_check = ingest_module.collapse, ingest_module.duplicate_accessions
    collapsed: list[int] = []

    def slow_collapse(table, piece_bytes):
        collapsed.append(table.num_rows)
        time.sleep(0.05)
        yield from real_collapse(table, piece_bytes)

    def slow_check(*args):
        time.sleep(0.3)
        return real_check(*args)

    monkeypatch.setattr(ingest_module, "collapse", slow_collapse)
    monkeypatch.setattr(ingest_module, "duplicate_accessions", slow_check)
    out = tmp_path / "out"
    with pytest.raises(InputFormatError, match=r"dups\.fa: record P00000 \(line 6001\): "
                       r"duplicate accession \(first seen in dups\.fa at line 1\)"):
        ingest([fasta], out, chunk_bytes=CHUNK, bucket_bytes=1 << 14, workers=2)
    planned = ingest_module.plan_buckets([fasta], 1 << 14)
    assert planned > 50 and 0 < len(collapsed) < planned / 2, (len(collapsed), planned)
    assert not out.exists() or list(out.rglob("*")) == []


def test_an_interrupt_stops_the_accession_check_beside_the_collapse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the collapse does not wait for the whole duplicate-accession check (at
    UniProt scale, a minute): it stops at its next partition, and no output is kept."""
    import time

    import pipeline.ingest as ingest_module

    fasta = write_fasta(tmp_path / "in.fa", _records(3000, {}))
    real_check = ingest_module.duplicate_accessions
    checked: list[int] = []

    def slow_check(partitions, *args):
        def slowly():
            for table in partitions:
                checked.append(table.num_rows)
                time.sleep(0.05)
                yield table
        return real_check(slowly(), *args)

    def interrupted(table, piece_bytes):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(ingest_module, "duplicate_accessions", slow_check)
    monkeypatch.setattr(ingest_module, "collapse", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ingest([fasta], out, chunk_bytes=CHUNK, bucket_bytes=1 << 14, workers=2)
    planned = ingest_module.plan_buckets([fasta], 1 << 14)
    assert planned > 50 and len(checked) < planned / 2, (len(checked), planned)
    assert not out.exists() or list(out.rglob("*")) == []


def test_parts_merge_to_the_same_bytes_when_partitions_split(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.partition as partition

    a, b, both = halves_of_sample(tmp_path)
    ingest([both], tmp_path / "whole", bucket_bytes=1 << 14, row_group_rows=1000, workers=1)
    monkeypatch.setattr(partition, "MAX_FANOUT", 4)
    parts = [tmp_path / "parts" / str(i) for i in range(2)]
    for i in range(2):
        ingest_part([a, b], i, parts[i], chunk_bytes=CHUNK, bucket_bytes=1 << 14, workers=2)
        assert {p.name for p in parts[i].glob("w*/seq-*.arrows")} <= {
            f"seq-{k:05d}.arrows" for k in range(4)}  # no more files than the fan-out
    merge_parts([a, b], parts, tmp_path / "merged", row_group_rows=1000)
    for name in OUTPUTS[:2]:
        assert (tmp_path / "merged" / name).read_bytes() == \
            (tmp_path / "whole" / name).read_bytes(), name


def test_a_partition_collapsed_in_pieces_writes_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collapse hands a partition to the writer in pieces (``_PIECE_BYTES``); piece
    boundaries (inside a run of identical sequences, too) leave the outputs as they are."""
    import pipeline.ingest as ingest_module

    text = _records(2000, {})
    fasta = write_fasta(tmp_path / "dups.fa", text + text.replace(">sp|P", ">tr|Q"))
    kwargs = {"chunk_bytes": CHUNK, "bucket_bytes": 1 << 30, "row_group_rows": 700, "workers": 1}
    whole = ingest([fasta], tmp_path / "whole", **kwargs)
    assert whole["unique_sequences"] == 2000 and whole["records_kept"] == 4000
    monkeypatch.setattr(ingest_module, "_PIECE_BYTES", 10_000)
    pieces: list[int] = []
    real_collapse = ingest_module.collapse

    def counting(table, piece_bytes):
        for uniques, records in real_collapse(table, piece_bytes):
            pieces.append(records.num_rows)
            yield uniques, records

    monkeypatch.setattr(ingest_module, "collapse", counting)
    assert ingest([fasta], tmp_path / "pieces", **kwargs) == whole
    assert len(pieces) > 100 and sum(pieces) == 4000
    assert outputs(tmp_path / "pieces") == outputs(tmp_path / "whole")


@pytest.mark.parametrize("bucket_bytes", [1 << 30, 1 << 16], ids=["in-memory", "partitions"])
def test_the_compiled_kernels_write_the_bytes_of_the_numpy_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scan: object, bucket_bytes: int) -> None:
    """pipeline/_scan.c (split, headers, md5, counts) against its numpy twins on the sample
    and on messy records (lower case, '*', CRLF, blank lines, odd headers), skip mode; with
    partitions, each chunk's rows are gathered in partition order."""
    from pipeline import kernels

    messy = write_fasta(tmp_path / "messy.fa", _records(300, {5: "mkv*", 9: "MK V\tL", 12: "MKJ"})
                        .replace("\n>sp|P00007", "\r\n\n>sp|P00007 ")
                        .replace(">sp|P00020|E20_HUMAN", ">UniRef90_Q9 x n=3 TaxID=77 \x0b"))
    inputs = [SAMPLE_FASTA, messy]
    got = ingest(inputs, tmp_path / "compiled", chunk_bytes=CHUNK, on_error="skip", workers=2,
                 bucket_bytes=bucket_bytes)
    monkeypatch.setattr(kernels, "SCAN", None)
    want = ingest(inputs, tmp_path / "numpy", chunk_bytes=CHUNK, on_error="skip", workers=2,
                  bucket_bytes=bucket_bytes)
    assert got == want and got["records_rejected"] == 1
    assert outputs(tmp_path / "compiled") == outputs(tmp_path / "numpy")


KILLED_IN_FINISH = r"""
import os, signal, sys
from pipeline import parquet_sink
from pipeline.ingest import ingest

real = parquet_sink.encode_row_group
encoded = []

def encode_then_die(table, schema, dest):
    real(table, schema, dest)
    encoded.append(dest)
    if len(encoded) == 3:  # row groups encoded, the outputs half-written
        os.kill(os.getpid(), signal.SIGKILL)
    return dest

parquet_sink.encode_row_group = encode_then_die
ingest([sys.argv[1]], sys.argv[2], chunk_bytes=1 << 14, bucket_bytes=1 << 16,
       row_group_rows=300, workers=2, worker_kind="thread")
"""


def test_an_ingest_killed_while_writing_leaves_only_temporaries_a_rerun_removes(
        tmp_path: Path) -> None:
    """SIGKILL in the final phase (row groups being encoded): no output appears
    under its name, and the next run removes every temporary and writes the clean bytes."""
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_FINISH, str(SAMPLE_FASTA), str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    left = sorted(p.name for p in out.iterdir())
    assert not {"sequences.parquet", "records.parquet"} & set(left)
    # half-written: the outputs' temporaries (row groups encoded straight into them, or into
    # ".rg<k>.tmp" parts beside them where several are in flight)
    assert any(name.startswith(".sequences.parquet.") and name.endswith(".tmp")
               for name in left), left
    kwargs = {"chunk_bytes": 1 << 14, "bucket_bytes": 1 << 16, "row_group_rows": 300}
    ingest([SAMPLE_FASTA], out, workers=2, **kwargs)
    ingest([SAMPLE_FASTA], tmp_path / "clean", workers=1, **kwargs)
    assert outputs(out) == outputs(tmp_path / "clean")
    assert sorted(p.name for p in out.iterdir()) == ["records.parquet", "sequences.parquet",
                                                     "stats"]
