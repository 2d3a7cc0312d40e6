from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.checksums import parse_checksum_list, parse_release
from pipeline.cli import main
from pipeline.download import RetryPolicy, fetch
from pipeline.errors import DownloadError
from tests.http_server import Behaviour, FileServer

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)  # several blocks, not block-aligned
FAST = RetryPolicy(retries=3, backoff_s=0.01, timeout_s=5, block_bytes=64 * 1024)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer(Behaviour(files={"/rel/data.fasta.gz": PAYLOAD})) as srv:
        yield srv


def test_dropped_connection_resumes_byte_identical(server: FileServer, tmp_path: Path) -> None:
    server.behaviour.drop_after["/rel/data.fasta.gz"] = [1_000_000, 700_000]
    dest = tmp_path / "data.fasta.gz"
    res = fetch(f"{server.base}/rel/data.fasta.gz", dest, sha256=sha(PAYLOAD), policy=FAST)
    assert dest.read_bytes() == PAYLOAD
    assert res.sha256 == sha(PAYLOAD) and not res.skipped
    ranges = [r for _, r in server.behaviour.requests]
    assert len(ranges) == 3 and ranges[0] is None
    # each retry resumes from what was written: past 0, at most where the server dropped
    first, second = (int(r.removeprefix("bytes=").rstrip("-")) for r in ranges[1:])
    assert 0 < first <= 1_000_000 < second <= first + 700_000
    assert not (tmp_path / "data.fasta.gz.part").exists()


def test_resume_from_partial_file_of_killed_process(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.fasta.gz"
    (tmp_path / "data.fasta.gz.part").write_bytes(PAYLOAD[:12345])
    fetch(f"{server.base}/rel/data.fasta.gz", dest, sha256=sha(PAYLOAD), policy=FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.behaviour.requests == [("/rel/data.fasta.gz", "bytes=12345-")]


def test_server_ignoring_range_restarts_cleanly(server: FileServer, tmp_path: Path) -> None:
    server.behaviour.ignore_range = True
    server.behaviour.drop_after["/rel/data.fasta.gz"] = [500_000]
    dest = tmp_path / "data.fasta.gz"
    fetch(f"{server.base}/rel/data.fasta.gz", dest, md5=hashlib.md5(PAYLOAD).hexdigest(),
          policy=FAST)
    assert dest.read_bytes() == PAYLOAD


def test_transient_5xx_is_retried(server: FileServer, tmp_path: Path) -> None:
    server.behaviour.statuses["/rel/data.fasta.gz"] = [503, 502]
    fetch(f"{server.base}/rel/data.fasta.gz", tmp_path / "d", sha256=sha(PAYLOAD), policy=FAST)
    assert len(server.behaviour.requests) == 3


def test_retries_are_bounded(server: FileServer, tmp_path: Path) -> None:
    server.behaviour.statuses["/rel/data.fasta.gz"] = [503] * 10
    with pytest.raises(DownloadError, match="giving up after 3 retries: HTTP 503"):
        fetch(f"{server.base}/rel/data.fasta.gz", tmp_path / "d", policy=FAST)
    assert len(server.behaviour.requests) == 4
    assert not (tmp_path / "d").exists()


def test_404_is_a_clear_error_without_retries(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"/rel/missing\.gz: HTTP 404 Not Found"):
        fetch(f"{server.base}/rel/missing.gz", tmp_path / "m", policy=FAST)
    assert len(server.behaviour.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_wrong_checksum_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.fasta.gz"
    with pytest.raises(DownloadError, match="sha256 mismatch") as err:
        fetch(f"{server.base}/rel/data.fasta.gz", dest, sha256="0" * 64, policy=FAST)
    assert "nothing written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_present_file_with_right_checksum_is_not_refetched(
    server: FileServer, tmp_path: Path
) -> None:
    dest = tmp_path / "data.fasta.gz"
    dest.write_bytes(PAYLOAD)
    res = fetch(f"{server.base}/rel/data.fasta.gz", dest, sha256=sha(PAYLOAD), policy=FAST)
    assert res.skipped and server.behaviour.requests == []
    dest.write_bytes(b"stale")  # wrong content: fetched again
    res = fetch(f"{server.base}/rel/data.fasta.gz", dest, sha256=sha(PAYLOAD), policy=FAST)
    assert not res.skipped and dest.read_bytes() == PAYLOAD


def test_local_path_and_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src.fa"
    src.write_bytes(b">a\nMK\n")
    for url in (str(src), src.as_uri()):
        dest = tmp_path / "out" / "copy.fa"
        dest.unlink(missing_ok=True)
        res = fetch(url, dest, sha256=sha(b">a\nMK\n"))
        assert dest.read_bytes() == b">a\nMK\n" and res.size == 6
    with pytest.raises(DownloadError, match="no such file"):
        fetch(str(tmp_path / "absent.fa"), tmp_path / "x")
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'"):
        fetch("ftp://example.org/x", tmp_path / "x")


METALINK = """<?xml version="1.0" encoding="UTF-8"?>
<metalink xmlns="http://www.metalinker.org/" version="3.0">
<publisher><name>UniProt</name></publisher>
<files>
<file name="data.fasta.gz"><size>{size}</size>
<verification><hash type="md5">{md5}</hash></verification>
<resources><url type="http" location="us">{url}</url></resources></file>
<file name="other.dat"><verification><hash type="md5">{zero}</hash></verification></file>
</files>
</metalink>
"""
RELDATE = """UniProt Knowledgebase Release 2024_03 consists of:
UniProtKB/Swiss-Prot Release 2024_03 of 29-May-2024
UniProtKB/TrEMBL Release 2024_03 of 29-May-2024
"""


def test_parse_checksum_formats() -> None:
    md5 = "d41d8cd98f00b204e9800998ecf8427e"
    text = METALINK.format(size=0, md5=md5.upper(), url="x", zero="0" * 32)
    parsed = parse_checksum_list(text, "RELEASE.metalink")
    assert parsed["data.fasta.gz"] == {"md5": md5, "size": "0"}
    assert parse_checksum_list(f"{md5}  ./dir/a.gz\n{'a' * 64} *b.gz\n", "md5")["b.gz"] == {
        "sha256": "a" * 64
    }
    with pytest.raises(DownloadError, match="no checksums found"):
        parse_checksum_list("hello\n", "bogus.txt")
    assert parse_release(RELDATE) == {"name": "2024_03", "date": "29-May-2024"}


def _config(tmp_path: Path, base: str, **release: str) -> Path:
    cfg = {
        "build": "t",
        "out_dir": str(tmp_path / "build"),
        "release": release,
        "inputs": [{"url": f"{base}/rel/data.fasta.gz"}],
        "download": {"retries": 2, "backoff_s": 0.01, "timeout_s": 5},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_download_stage_uses_release_checksums(server: FileServer, tmp_path: Path) -> None:
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    url = f"{server.base}/rel/data.fasta.gz"
    server.behaviour.files["/rel/RELEASE.metalink"] = METALINK.format(
        size=len(PAYLOAD), md5=md5, url=url, zero="0" * 32).encode()
    server.behaviour.files["/rel/reldate.txt"] = RELDATE.encode()
    server.behaviour.drop_after["/rel/data.fasta.gz"] = [2_000_000]
    cfg = _config(tmp_path, server.base, checksums_url=f"{server.base}/rel/RELEASE.metalink",
                  reldate_url=f"{server.base}/rel/reldate.txt")
    assert main(["download", "--config", str(cfg)]) == 0
    record = json.loads((tmp_path / "build/raw/download.json").read_text())
    assert record["release"] == {"name": "2024_03", "date": "29-May-2024"}
    assert record["inputs"][0]["md5"] == md5 and record["inputs"][0]["verified_with"] == ["md5"]
    assert (tmp_path / "build/raw/data.fasta.gz").read_bytes() == PAYLOAD


def test_download_stage_checksum_mismatch_exits_nonzero(
    server: FileServer, tmp_path: Path, capsys
) -> None:
    server.behaviour.files["/rel/RELEASE.metalink"] = METALINK.format(
        size=len(PAYLOAD), md5="f" * 32, url="x", zero="0" * 32).encode()
    cfg = _config(tmp_path, server.base, checksums_url=f"{server.base}/rel/RELEASE.metalink")
    assert main(["download", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "md5 mismatch" in err[0] and "data.fasta.gz" in err[0]
    assert not (tmp_path / "build/raw/data.fasta.gz").exists()
    assert not (tmp_path / "build/raw/data.fasta.gz.part").exists()
    assert not (tmp_path / "build/raw/download.json").exists()


def test_download_stage_404(server: FileServer, tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, server.base)
    server.behaviour.files.clear()
    assert main(["download", "--config", str(cfg)]) == 1
    assert "HTTP 404 Not Found" in capsys.readouterr().err


def test_checksums_from_several_release_files(server: FileServer, tmp_path: Path) -> None:
    """A UniRef build: uniref50/RELEASE.metalink and uniref90/RELEASE.metalink, merged; kept
    under raw/ as uniref50-RELEASE.metalink and uniref90-RELEASE.metalink."""
    other = b">UniRef90_P1 x n=1 RepID=P1\nMKV\n"
    server.behaviour.files["/uniref90/other.dat"] = other
    server.behaviour.files["/uniref50/RELEASE.metalink"] = METALINK.format(
        size=len(PAYLOAD), md5=hashlib.md5(PAYLOAD).hexdigest(), url="x",
        zero="0" * 32).encode()
    server.behaviour.files["/uniref90/RELEASE.metalink"] = METALINK.replace(
        'name="data.fasta.gz"', 'name="unused.gz"').format(
        size=0, md5="0" * 32, url="x", zero=hashlib.md5(other).hexdigest()).encode()
    server.behaviour.files["/uniref50/data.fasta.gz"] = PAYLOAD
    cfg = yaml.safe_load(_config(tmp_path, server.base, checksums_url=[
        f"{server.base}/uniref50/RELEASE.metalink",
        f"{server.base}/uniref90/RELEASE.metalink"]).read_text())
    cfg["inputs"] = [{"url": f"{server.base}/uniref50/data.fasta.gz"},
                     {"url": f"{server.base}/uniref90/other.dat"}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["download", "--config", str(path)]) == 0
    record = json.loads((tmp_path / "build/raw/download.json").read_text())
    assert [i["verified_with"] for i in record["inputs"]] == [["md5"], ["md5"]]
    assert sorted(f["path"] for f in record["release_files"]) == [
        "uniref50-RELEASE.metalink", "uniref90-RELEASE.metalink"]
