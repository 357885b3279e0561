"""A fingerprint of an ingest's inputs: what changes it is what makes a new version.

Local files are hashed by content (relative path + bytes), so the same data copied elsewhere has
the same fingerprint; remote objects by path, size and ETag/mtime. The Refs themselves are
hashed too, which covers images a manifest names outside the source folder by location.
"""

from __future__ import annotations

import hashlib
import json

from pipelines.ingest.layout import get_fs, is_remote

_CHUNK = 1 << 20


def _file_digest(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(source: str, refs: list[dict]) -> dict:
    """`{"source", "files", "bytes", "fingerprint"}` for one source."""
    fs, root = get_fs(source)
    paths = [root] if fs.isfile(root) else sorted(fs.find(root))
    h = hashlib.sha256()
    total = 0
    for path in paths:
        info = fs.info(path)
        size = int(info.get("size") or 0)
        total += size
        rel = path[len(root):].lstrip("/") if path != root else path.rsplit("/", 1)[-1]
        if is_remote(source):
            stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
            h.update(f"{rel}\0{size}\0{stamp}\n".encode())
        else:
            h.update(f"{rel}\0{size}\0{_file_digest(fs, path)}\n".encode())
    for ref in refs:
        h.update(json.dumps([ref.get("id"), (ref.get("image") or {}).get("uri", "")]).encode())
    return {"source": source, "files": len(paths), "bytes": total, "fingerprint": h.hexdigest()}
