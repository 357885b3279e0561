"""A fingerprint of an ingest's inputs: what changes it is what makes a new version.

Local files are hashed by content (relative path + bytes), so the same data copied elsewhere has
the same fingerprint; remote objects by path, size and ETag/mtime. The Refs themselves are
hashed too, which covers images a manifest names outside the source folder by location.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from pipelines.ingest.layout import get_fs, is_remote

_CHUNK = 1 << 20


def _file_digest(path: str) -> str:
    """sha256 of a local file (plain `open`: fsspec's local layer costs more than the hashing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(source: str, refs: list[dict]) -> dict:
    """`{"source", "files", "bytes", "fingerprint"}` for one source.

    Files are hashed by a few threads (hashlib and file reads release the GIL; remote `info`
    calls wait on the network), and combined in path order, so the result does not depend on timing.
    """
    fs, root = get_fs(source)
    paths = [root] if fs.isfile(root) else sorted(fs.find(root))
    remote = is_remote(source)

    def entry(path: str) -> tuple[int, str]:
        rel = path[len(root):].lstrip("/") if path != root else path.rsplit("/", 1)[-1]
        if remote:
            info = fs.info(path)
            size = int(info.get("size") or 0)
            stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        else:
            size, stamp = os.stat(path).st_size, _file_digest(path)
        return size, f"{rel}\0{size}\0{stamp}\n"

    # Contiguous slices, one per thread: a task per file would cost more in hand-offs than it hashes.
    threads = min(8, os.cpu_count() or 1) if not remote else 8
    step = -(-len(paths) // threads) if paths else 1
    h = hashlib.sha256()
    total = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for part in pool.map(lambda i: [entry(p) for p in paths[i : i + step]], range(0, len(paths), step)):
            for size, line in part:
                total += size
                h.update(line.encode())
    for ref in refs:
        h.update(json.dumps([ref.get("id"), (ref.get("image") or {}).get("uri", "")]).encode())
    return {"source": source, "files": len(paths), "bytes": total, "fingerprint": h.hexdigest()}
