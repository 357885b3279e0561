"""The one place that knows a dataset version's layout on disk or object storage.

```
<root>/<version>/manifest.json     written last: its presence marks the version complete
<root>/<version>/report.json       counts: seen, kept, rejected by reason, duplicates
<root>/<version>/rejects.jsonl     one line per dropped input, with its reason
<root>/<version>/{train,val,test}/shard-000000.tar
<root>/_index/<key>.json          a listing (names, sizes, mtimes) that made a version: see job.py
<root>/_staging/<key>/            cleaned samples of a running ingest (removed when it ends)
```
Paths may be local or any fsspec URI (`s3://...`).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
REPORT = "report.json"
REJECTS = "rejects.jsonl"
SHARD_NAME = "shard-{index:06d}.tar"
PARTIAL_SUFFIX = ".partial"  # in-progress files: never match `*.tar`, so never look finished
STAGING_DIR = "_staging"
INDEX_DIR = "_index"


def is_remote(uri: str | os.PathLike) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def get_fs(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or any fsspec URI."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def join(base: str | os.PathLike, *parts: str) -> str:
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index=index)


def read_json(uri: str | os.PathLike) -> dict[str, Any]:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


@contextlib.contextmanager
def open_atomic(uri: str | os.PathLike) -> Iterator[Any]:
    """A file to write, under a temporary name renamed to `uri` when the block ends without an
    error: readers never see a half-written file (a failed write leaves only a `.partial`)."""
    fs, path = get_fs(uri)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(tmp, "wb") as f:
        yield f
    fs.mv(tmp, path)


def write_bytes_atomic(uri: str | os.PathLike, data: bytes) -> None:
    """Write under a temporary name, then rename: readers never see a half-written file."""
    with open_atomic(uri) as f:
        f.write(data)


def write_json_atomic(uri: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def exists(uri: str | os.PathLike) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def remove(uri: str | os.PathLike) -> None:
    """Delete a file or a directory tree, if there."""
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def is_complete(version_dir: str | os.PathLike) -> bool:
    return exists(join(version_dir, MANIFEST))


def read_manifest(version_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete version; a clear error when the directory is not one."""
    uri = join(version_dir, MANIFEST)
    fs, path = get_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"{version_dir} is not a complete dataset version (no {MANIFEST}). Pass the directory "
            "printed by `mmfusion data ingest`, or re-run the ingest to complete it."
        )
    return read_json(uri)


def read_report(version_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(join(version_dir, REPORT))


def shard_paths(version_dir: str | os.PathLike, split: str) -> list[str]:
    """Paths (or URIs) of the finished shards of one split, in order, from the manifest."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    manifest = read_manifest(version_dir)
    return [join(version_dir, entry["path"]) for entry in manifest["splits"].get(split, [])]


def as_path(uri: str) -> Path | str:
    """A local `Path` for local locations, the URI string otherwise."""
    return uri if is_remote(uri) else Path(get_fs(uri)[1])


# ----------------------------------------------------------------------------- reading shards


def open_shard(url: str):
    """A binary stream for a local path, `file://`, `pipe:`/`http(s)://` (webdataset's gopen),
    or any fsspec URI such as `s3://bucket/x.tar` (object storage)."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file", "pipe", "http", "https") or len(scheme) == 1:  # len 1: C:\ paths
        import webdataset as wds

        return wds.gopen(url, "rb")
    return fsspec.open(url, "rb").open()


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard: `{"__key__", "jpg": bytes, "txt": bytes, "json": bytes}`."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_shard(url)
    try:
        files = tar_file_expander([{"url": url, "stream": stream}])
        for sample in group_by_keys(files):
            sample.pop("__url__", None)
            sample.pop("__local_path__", None)
            yield sample
    finally:
        stream.close()
