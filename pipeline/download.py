"""Resumable, checksum-verified downloads of release files (https, http, file://, local paths)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests

from pipeline.atomic import write_text_atomic
from pipeline.checksums import FileDigest, digest_file, parse_checksum_list, parse_release
from pipeline.config import BuildConfig
from pipeline.errors import DownloadError
from pipeline.progress import byte_bar

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class FetchResult:
    """What was fetched (or found already in place) and its digests."""

    url: str
    path: str
    size: int
    md5: str
    sha256: str
    skipped: bool

    def record(self) -> dict[str, object]:
        """Manifest record (without the run-dependent ``skipped`` flag)."""
        out = asdict(self)
        del out["skipped"]
        return out


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential back-off; a retry that made progress resets the count."""

    retries: int = 5
    backoff_s: float = 2.0
    timeout_s: float = 60.0
    block_bytes: int = 1 << 20


class _Retryable(Exception):
    """A transient failure: the attempt may be repeated (resuming where it stopped)."""


def _check(digest: FileDigest, url: str, md5: str | None, sha256: str | None) -> str | None:
    if md5 and digest.md5 != md5.lower():
        return f"md5 mismatch for {url}: expected {md5.lower()}, got {digest.md5}"
    if sha256 and digest.sha256 != sha256.lower():
        return f"sha256 mismatch for {url}: expected {sha256.lower()}, got {digest.sha256}"
    return None


def local_source(url: str) -> Path | None:
    """The file a file:// URL or a plain path names (None for http/https)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(url)
    if parsed.scheme in ("http", "https"):
        return None
    raise DownloadError(f"{url}: unsupported URL scheme '{parsed.scheme}' (use https, http, file)")


def _copy_local(src: Path, part: Path, url: str, policy: RetryPolicy) -> None:
    if not src.is_file():
        raise DownloadError(f"{url}: no such file")
    with open(src, "rb") as fin, open(part, "wb") as fout, byte_bar(
        src.stat().st_size, f"copy {src.name}"
    ) as bar:
        while block := fin.read(policy.block_bytes):
            fout.write(block)
            bar.update(len(block))


def _total_from(resp: requests.Response, offset: int) -> int | None:
    rng = resp.headers.get("Content-Range", "")
    if "/" in rng and not rng.endswith("/*"):
        return int(rng.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return int(length) + offset if length is not None else None


def _http_attempt(session: requests.Session, url: str, part: Path, policy: RetryPolicy) -> None:
    """One GET, resuming from ``part``'s size; raises _Retryable on transient failures."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=policy.timeout_s)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Retryable(f"connection failed: {err.__class__.__name__}") from None
    with resp:
        if resp.status_code == 416 and offset:
            part.unlink()  # our partial file is not a prefix the server recognises: restart
            raise _Retryable("HTTP 416 on resume; restarting from byte 0")
        if resp.status_code in _RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {resp.status_code} {resp.reason}")
        if resp.status_code == 200:
            offset = 0  # server ignored Range: start over
        elif not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            part.unlink()
            raise _Retryable("server resumed at an unexpected offset; restarting")
        total = _total_from(resp, offset)
        mode = "ab" if offset else "wb"
        got = offset
        with open(part, mode) as fh, byte_bar(total, f"fetch {part.name[:-5]}", offset) as bar:
            try:
                for block in resp.iter_content(chunk_size=policy.block_bytes):
                    fh.write(block)
                    got += len(block)
                    bar.update(len(block))
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as err:
                why = err.__class__.__name__
                raise _Retryable(f"connection dropped at byte {got}: {why}") from None
        if total is not None and got != total:
            raise _Retryable(f"connection closed at byte {got} of {total}")


def _http_fetch(url: str, part: Path, policy: RetryPolicy) -> None:
    failures = 0
    with requests.Session() as session:
        session.headers["User-Agent"] = "esm2-pretrain"
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _http_attempt(session, url, part, policy)
                return
            except _Retryable as why:
                after = part.stat().st_size if part.exists() else 0
                failures = 0 if after > before else failures + 1
                if failures > policy.retries:
                    raise DownloadError(
                        f"{url}: giving up after {policy.retries} retries: {why}"
                    ) from None
                wait = min(policy.backoff_s * (2 ** max(failures - 1, 0)), _MAX_BACKOFF_S)
                log.warning("%s: %s; retrying in %.1fs", url, why, wait)
                time.sleep(wait)


def fetch(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    policy: RetryPolicy | None = None,
) -> FetchResult:
    """Fetch ``url`` to ``dest`` atomically and verify its checksum.

    A file already at ``dest`` that matches the expected checksum is kept (not fetched again).
    An interrupted HTTP transfer resumes from ``dest.part`` with a Range request, also across
    process restarts. On a checksum mismatch nothing is left at ``dest`` and the partial file
    is removed.
    """
    policy = policy or RetryPolicy()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        digest = digest_file(dest)
        if _check(digest, url, md5, sha256) is None:
            return FetchResult(url, str(dest), digest.size, digest.md5, digest.sha256, True)
        log.warning("%s exists but its checksum does not match: fetching again", dest)
    part = dest.with_name(dest.name + ".part")
    src = local_source(url)
    if src is not None:
        _copy_local(src, part, url, policy)
    else:
        _http_fetch(url, part, policy)
    digest = digest_file(part)
    problem = _check(digest, url, md5, sha256)
    if problem:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{problem} (partial file removed, nothing written to {dest})")
    os.replace(part, dest)
    return FetchResult(url, str(dest), digest.size, digest.md5, digest.sha256, False)


def _fetch_release_file(url: str, raw: Path, policy: RetryPolicy,
                        qualify: bool = False) -> tuple[dict, str]:
    """Fetch a small release file (checksum list, release notes): its record and its text.
    ``qualify``: name it ``<parent dir>-<name>`` (several release files of one name)."""
    parts = urlparse(url).path.rstrip("/").rsplit("/", 2) if "://" in url else str(
        url).rstrip("/").rsplit("/", 2)
    name = parts[-1] or "release-file"
    if qualify and len(parts) > 1 and parts[-2]:
        name = f"{parts[-2]}-{name}"
    res = fetch(url, raw / name, policy=policy)
    record = {**res.record(), "path": name}
    return record, Path(res.path).read_text(encoding="utf-8", errors="replace")


def _expected_digests(cfg: BuildConfig, published: dict[str, dict[str, str]]) -> list[dict]:
    out = []
    for item in cfg.inputs:
        md5, sha256 = item.md5, item.sha256
        if published:
            entry = published.get(item.file_name)
            if entry is None and not (md5 or sha256):
                raise DownloadError(
                    f"{', '.join(cfg.release.checksum_urls)}: no checksum listed for "
                    f"{item.file_name}")
            entry = entry or {}
            md5, sha256 = md5 or entry.get("md5"), sha256 or entry.get("sha256")
        out.append({"md5": md5, "sha256": sha256})
    return out


def run(cfg: BuildConfig) -> dict:
    """Download every input of a build into ``<out>/raw`` and write ``raw/download.json``."""
    policy = RetryPolicy(
        cfg.download.retries, cfg.download.backoff_s, cfg.download.timeout_s,
        cfg.download.block_bytes,
    )
    raw = cfg.raw_dir
    release: dict[str, object] = {"name": cfg.release.name, "date": None}
    meta_files = []
    published: dict[str, dict[str, str]] = {}
    if cfg.release.reldate_url:
        record, text = _fetch_release_file(cfg.release.reldate_url, raw, policy)
        found = parse_release(text)
        release = {"name": cfg.release.name or found["name"], "date": found["date"]}
        meta_files.append(record)
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in cfg.release.checksum_urls]
    for url in cfg.release.checksum_urls:
        record, text = _fetch_release_file(url, raw, policy, qualify=len(set(names)) < len(names))
        published.update(parse_checksum_list(text, url))
        meta_files.append(record)
    results = []
    for item, expected in zip(cfg.inputs, _expected_digests(cfg, published), strict=True):
        res = fetch(item.url, cfg.raw_path(item), policy=policy, **expected)
        results.append({**res.record(), "path": item.file_name, "verified_with": sorted(
            k for k, v in expected.items() if v)})
    record = {"release": release, "release_files": meta_files, "inputs": results}
    write_text_atomic(cfg.out.download_record,
                      json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
