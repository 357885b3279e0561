"""A fingerprint of an ingest's inputs: what changes it is what makes a new version.

Local files are hashed by content (relative path + bytes), so the same data copied elsewhere has
the same fingerprint; remote objects by path, size and ETag/mtime. The Refs themselves are
hashed too, which covers images a manifest names outside the source folder by location.

Hashing every local byte on the driver would read the whole source through one machine before
any cleaning starts. So the image files are hashed by the Ray workers that read them anyway
(`stage.process_batch` gives each row its file's sha256, `file_sha`), and the driver hashes only what no worker read
(manifests, annotation files, images of rejected Refs). Both ways give the same value.

`quick_key` is the cheap stand-in, from the listing alone (path, size, mtime): the same key means
the inputs are very likely unchanged, which tells `ingest` to check by content *before* cleaning
(the re-run case: nothing is started when the version exists).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipelines.core.storage import get_fs, is_remote, sha256_file


@dataclass(frozen=True)
class Listing:
    """Every file of a source, listed once: `(path, size, stamp)` sorted by path, where stamp is
    the mtime (local) or ETag / modification time (remote)."""

    source: str
    root: str
    remote: bool
    files: tuple[tuple[str, int, str], ...]

    def rel(self, path: str) -> str:
        return path[len(self.root):].lstrip("/") if path != self.root else path.rsplit("/", 1)[-1]


def _stamp(info: dict) -> str:
    value = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return str(value)


def _walk_local(root: str) -> list[tuple[str, int, str]]:
    """`os.scandir` recursion: what `fs.find(detail=True)` lists, at a fraction of its cost."""
    out, todo, seen = [], [root], {os.path.realpath(root)}
    while todo:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.is_dir():  # followed when a link, once: a link cycle ends here
                    if (real := os.path.realpath(e.path)) not in seen:
                        seen.add(real)
                        todo.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    out.append((e.path, st.st_size, str(st.st_mtime)))
    return out


def list_source(source: str) -> Listing:
    """One listing call (a directory walk, or one LIST on object storage); no per-file requests."""
    fs, root = get_fs(source)
    root = root.rstrip("/") or root
    remote = is_remote(source)
    if fs.isfile(root):
        info = fs.info(root)
        files = [(root, int(info.get("size") or 0), _stamp(info))]
    elif not remote:
        files = _walk_local(root)
    else:
        files = [(p, int(i.get("size") or 0), _stamp(i)) for p, i in fs.find(root, detail=True).items()]
    return Listing(source, root, remote, tuple(sorted(files)))


def _refs_digest(h, refs: list[dict]) -> None:
    for ref in refs:
        item = [ref.get("id"), (ref.get("image") or {}).get("uri", "")]
        if ref.get("audio"):  # only then: image-only sources keep the digests they had
            item.append(ref["audio"].get("uri", ""))
        h.update(json.dumps(item).encode())


def quick_key(listing: Listing, refs: list[dict], salt: str = "") -> str:
    """sha256 of what the listing says (names, sizes, mtimes / ETags) and the Refs."""
    h = hashlib.sha256(salt.encode())
    for path, size, stamp in listing.files:
        h.update(f"{listing.rel(path)}\0{size}\0{stamp}\n".encode())
    _refs_digest(h, refs)
    return h.hexdigest()


def local_path(uri: str) -> str:
    """The key a worker's file digest is filed under: the absolute path, as the listing has it."""
    return os.path.abspath(uri.removeprefix("file://"))


def fingerprint(listing: Listing, refs: list[dict], digests: dict[str, str] | None = None) -> dict:
    """`{"source", "files", "bytes", "fingerprint"}` for one source.

    `digests` maps local paths (`local_path`) to sha256s already computed elsewhere; the other
    local files are hashed here by a few threads (hashlib and file reads release the GIL), and
    combined in path order, so the result depends neither on timing nor on who hashed what.
    """
    digests = digests or {}
    todo = [p for p, _, _ in listing.files if not listing.remote and p not in digests]
    hashed: dict[str, str] = {}
    if todo:  # contiguous slices, one per thread: a task per file costs more in hand-offs
        threads = min(8, os.cpu_count() or 1, len(todo))
        step = -(-len(todo) // threads)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = pool.map(lambda i: [(p, sha256_file(p)) for p in todo[i : i + step]], range(0, len(todo), step))
            hashed = {p: d for part in parts for p, d in part}
    h = hashlib.sha256()
    for path, size, stamp in listing.files:
        if not listing.remote:
            stamp = digests.get(path) or hashed[path]
        h.update(f"{listing.rel(path)}\0{size}\0{stamp}\n".encode())
    _refs_digest(h, refs)
    return {"source": listing.source, "files": len(listing.files), "bytes": sum(s for _, s, _ in listing.files),
            "fingerprint": h.hexdigest()}
