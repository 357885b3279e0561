"""Files on a local disk or any fsspec URI (`s3://...`): paths, atomic writes, JSON, hashes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")  # what counts as an image file
PARTIAL_SUFFIX = ".partial"  # in-progress files: never match `*.tar`, so never look finished
_CHUNK = 1 << 20


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


def as_path(uri: str) -> Path | str:
    """A local `Path` for local locations, the URI string otherwise."""
    return uri if is_remote(uri) else Path(get_fs(uri)[1])


def read_json(uri: str | os.PathLike) -> Any:
    """A JSON document from a local path or any fsspec URI."""
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


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a local file (plain `open`: fsspec's local layer costs more than the hashing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def local_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock between processes on this file system (`flock` on `path`), for short
    critical sections. The file is removed on release; a waiter that then holds a lock on the
    removed file sees its inode gone and locks the path anew. A dead holder's lock is released
    by the kernel."""
    path = str(path)
    while True:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed between the two calls: again
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def rename_dir_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Rename the local directory `src` to `dst` in one step; False (and `src` left) when `dst`
    exists and is not empty. Never replaces anything that has files in it."""
    try:
        os.rename(src, dst)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise


def remove_older_than(uri: str | os.PathLike, seconds: float) -> list[str]:
    """Remove the entries of a local directory last modified more than `seconds` ago (leftovers
    of killed runs); returns their paths. Nothing for remote or missing directories."""
    if is_remote(uri) or not os.path.isdir(get_fs(uri)[1]):
        return []
    root, gone = get_fs(uri)[1], []
    for entry in os.scandir(root):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - entry.stat(follow_symlinks=False).st_mtime > seconds:
                remove(entry.path)
                gone.append(entry.path)
    return gone
