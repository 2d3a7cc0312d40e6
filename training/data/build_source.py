"""Where a dataset build is read from: a local directory, or a URL with a local cache.

``--data`` takes a build directory, ``file://…``, ``http(s)://…`` (a web server that serves the
build directory) or an object-store URL that fsspec knows (``s3://…``, ``gs://…`` with s3fs or
gcsfs installed). A remote build's files are fetched on first use into the cache directory
(``--cache-dir``, else ``$ESM2_CACHE``, else ``~/.cache/esm2-pretrain``) under a name derived from
the URL: ``index.json`` when a split is opened (and the per-sample arrays when they are not
cached or the index changed), each shard when a loader worker first reads from it. Shards are
checked against the sha256 that ``index.json`` lists before they are used; fetches resume after
a dropped connection and land atomically, and ranks that share a cache take turns through a lock
file, so one node fetches each file once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from pipeline.build_dir import BuildDir
from pipeline.checksums import sha256_file
from pipeline.errors import PipelineError
from pipeline.shards import ARRAYS, INDEX, read_index, shard_name

_HTTP = ("http", "https")


def default_cache_root() -> Path:
    return Path(os.environ.get("ESM2_CACHE") or Path.home() / ".cache" / "esm2-pretrain")


class BuildSource:
    """A build's files as local paths (fetching a remote build's files into the cache)."""

    def __init__(self, location: str | os.PathLike[str], cache_dir: str | None = None) -> None:
        text = str(location)
        scheme = urlparse(text).scheme
        self.location = text.rstrip("/")
        self.remote = scheme not in ("", "file")
        if not self.remote:
            self.root = Path(text.removeprefix("file://"))
        else:
            digest = hashlib.sha256(self.location.encode()).hexdigest()[:16]
            self.root = Path(cache_dir or default_cache_root()) / "builds" / digest
        self._verified: set[Path] = set()

    def __str__(self) -> str:
        return self.location

    def path(self, relative: str) -> Path:
        """The local path of a build file (not fetched)."""
        return self.root / relative

    def fetch(self, relative: str, sha256: str | None = None, refresh: bool = False) -> Path:
        """The local path of a build file; a remote build fetches it into the cache first
        (``refresh``: fetch again even if cached; ``sha256``: verify, also a cached copy once)."""
        dest = self.root / relative
        if not self.remote:
            return dest
        if dest in self._verified and not refresh:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest):
            marker = dest.with_name(dest.name + ".sha256")
            cached = dest.is_file() and not refresh and (
                sha256 is None or (marker.is_file() and marker.read_text().strip() == sha256))
            if not cached:
                _download(f"{self.location}/{relative}", dest, sha256)
                if sha256:
                    marker.write_text(sha256 + "\n")
        self._verified.add(dest)
        return dest

    def split_dir(self, split: str) -> Path:
        """The local directory of ``shards/<split>`` with its index and arrays (not the shards)."""
        rel = BuildDir.split_rel(split)
        if self.remote:  # the index always; the arrays (GBs at scale) only when it changed
            cached = self.path(f"{rel}/{INDEX}")
            before = cached.read_bytes() if cached.is_file() else None
            changed = self.fetch(f"{rel}/{INDEX}", refresh=True).read_bytes() != before
            for file, _ in ARRAYS.values():
                self.fetch(f"{rel}/{file}", refresh=changed)
        elif not (self.root / rel / INDEX).is_file():
            raise PipelineError(f"{self.root}: not a dataset build (no {rel}/{INDEX})")
        return self.root / rel

    def shard_opener(self, split: str) -> ShardOpener:
        return ShardOpener(self, split)

    def validation_shard(self) -> Path | None:
        """The fixed validation set's shard, if the build has one."""
        name = shard_name(BuildDir.VALIDATION, 0)  # the set is one shard
        rel = f"{BuildDir.VALIDATION}/{name}"
        if not self.remote:
            path = self.root / rel
            return path if path.is_file() else None
        try:
            index = read_index(self.fetch(f"{BuildDir.VALIDATION}/{INDEX}", refresh=True).parent)
        except PipelineError:
            return None
        sha = {s["file"]: s["sha256"] for s in index["shards"]}.get(name)
        return self.fetch(rel, sha)


class ShardOpener:
    """``name → local path`` for one split's shards (picklable: used in loader workers)."""

    def __init__(self, source: BuildSource, split: str) -> None:
        self.source, self.split = source, split
        self.sha256: dict[str, str] | None = None

    def __call__(self, name: str) -> Path:
        if not self.source.remote:
            return self.source.path(f"{BuildDir.split_rel(self.split)}/{name}")
        if self.sha256 is None:
            index = read_index(self.source.path(BuildDir.split_rel(self.split)))
            self.sha256 = {s["file"]: s["sha256"] for s in index["shards"]}
        return self.source.fetch(f"{BuildDir.split_rel(self.split)}/{name}",
                                 self.sha256.get(name))


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    with open(dest.with_name(dest.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download(url: str, dest: Path, sha256: str | None) -> None:
    """Fetch ``url`` and put it at ``dest`` in one rename: a rank reading the cached copy
    meanwhile (another rank refreshing the index) never finds it missing or half-written."""
    fresh = dest.with_name(f".{dest.name}.{os.getpid()}.fetch")
    if urlparse(url).scheme in _HTTP:
        from pipeline.download import fetch

        fresh.unlink(missing_ok=True)
        fetch(url, fresh, sha256=sha256)  # resumable, verified, atomic
        os.replace(fresh, dest)
        return
    import fsspec  # object stores (s3fs, gcsfs, ...): whatever fsspec has installed

    part = fresh
    try:
        with fsspec.open(url, "rb") as src, open(part, "wb") as out:
            while block := src.read(1 << 22):
                out.write(block)
    except (OSError, ValueError, ImportError) as exc:
        part.unlink(missing_ok=True)
        raise PipelineError(f"{url}: cannot fetch ({exc})") from None
    if sha256 and sha256_file(part) != sha256:
        part.unlink(missing_ok=True)
        raise PipelineError(f"{url}: sha256 differs from the build's index (nothing written)")
    os.replace(part, dest)
