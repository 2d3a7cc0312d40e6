"""File hashing and parsing of published checksum lists (UniProt RELEASE.metalink, md5sum)."""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from pipeline.errors import DownloadError

_HASH_BLOCK = 4 << 20


@dataclass(frozen=True)
class FileDigest:
    """Size and digests of a file."""

    size: int
    md5: str
    sha256: str


def digest_file(path: str | os.PathLike[str]) -> FileDigest:
    """md5 and sha256 of a file, read in blocks."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            md5.update(block)
            sha.update(block)
            size += len(block)
    return FileDigest(size=size, md5=md5.hexdigest(), sha256=sha.hexdigest())


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            sha.update(block)
    return sha.hexdigest()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_metalink(text: str, source: str) -> dict[str, dict[str, str]]:
    """``{file name: {"md5": ..., "size": ...}}`` from a metalink (v3 or v4) document."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise DownloadError(f"{source}: not a valid metalink document: {err}") from None
    out: dict[str, dict[str, str]] = {}
    for node in root.iter():
        if _local(node.tag) != "file" or "name" not in node.attrib:
            continue
        entry: dict[str, str] = {}
        for child in node.iter():
            tag = _local(child.tag)
            if tag == "hash" and child.text:
                kind = (child.attrib.get("type") or "").lower().replace("-", "")
                if kind in ("md5", "sha256"):
                    entry[kind] = child.text.strip().lower()
            elif tag == "size" and child.text:
                entry["size"] = child.text.strip()
        out[node.attrib["name"]] = entry
    return out


_MD5SUM_LINE = re.compile(r"^([0-9a-fA-F]{32}|[0-9a-fA-F]{64})\s+\*?(\S.*?)\s*$")


def parse_checksum_list(text: str, source: str) -> dict[str, dict[str, str]]:
    """Parse a metalink or an ``md5sum``/``sha256sum`` style list into per-file digests."""
    if text.lstrip().startswith("<"):
        return parse_metalink(text, source)
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        m = _MD5SUM_LINE.match(line)
        if m:
            digest, name = m.group(1).lower(), m.group(2)
            kind = "md5" if len(digest) == 32 else "sha256"
            out.setdefault(os.path.basename(name), {})[kind] = digest
    if not out:
        raise DownloadError(f"{source}: no checksums found (expected a metalink or md5sum list)")
    return out


_RELEASE = re.compile(r"Release\s+(\d{4}_\d{2})(?:\s+of\s+(\d{1,2}-[A-Za-z]{3}-\d{4}))?")


def parse_release(text: str) -> dict[str, str | None]:
    """Release name and date (``2024_03``, ``29-May-2024``) from UniProt's reldate.txt."""
    name = date = None
    for m in _RELEASE.finditer(text):
        name = name or m.group(1)
        date = date or m.group(2)
    return {"name": name, "date": date}
