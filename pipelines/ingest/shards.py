"""Packing kept samples into WebDataset shards and writing one shard atomically.

Cleaning workers serialise every kept sample once, as its tar members (those webdataset's
TarWriter writes: fixed mtime and owner, members of a sample contiguous and sorted), into a
staging file per batch and split (`MemberWriter`). A tar archive is its members back to back followed by an end marker,
so writing a shard is copying the planned samples' member bytes in order and closing the archive
the way `tarfile` does (`archive_end`): the second pass neither decodes nor re-serialises, and
the shard is byte-for-byte the tar a single TarWriter would have written. On local disks the copy
is done by the kernel (copy_file_range) and the checksum reads the staged bytes through a memory
map, so the bytes never pass through Python. Only a sample that an exact duplicate merged
captions into is rewritten, through `MemberWriter` again.

Shards of a split are filled in input order up to `shard_samples` samples and `shard_max_bytes`
bytes. A shard is written under a `.partial` name and renamed when complete, so a killed job
never leaves a finished-looking shard.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import mmap
import os
import tarfile
from typing import Any

from pipelines.core.dataset import SPLITS, shard_path
from pipelines.core.storage import PARTIAL_SUFFIX, get_fs, is_remote, join

TAR_MTIME = 946684800  # 2000-01-01: a fixed mtime makes the tar bytes reproducible
TAR_OWNER = "mmfusion"
_TAR_END = 2 * tarfile.BLOCKSIZE  # two zero blocks end an archive
_RECORD = tarfile.RECORDSIZE  # and tarfile pads the archive to a multiple of this


def archive_bytes(member_bytes: int) -> int:
    """Size of a tar archive whose members take `member_bytes`."""
    return -(-(member_bytes + _TAR_END) // _RECORD) * _RECORD


def archive_end(member_bytes: int) -> bytes:
    """What `tarfile` writes on close after `member_bytes` of members: end marker + padding."""
    return bytes(archive_bytes(member_bytes) - member_bytes)


def padded(n: int) -> int:
    """Bytes a member's data takes in a tar (padded to whole blocks)."""
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class MemberWriter:
    """Samples serialised as tar members, back to back, without the end marker.

    Writes to `fileobj` as samples come (a staging file: nothing held in memory), or to a buffer
    that `getvalue()` returns. `add(sample)` returns `(offset, length)` of the sample's members;
    `finish()` returns the bytes written.

    The members are those webdataset's `TarWriter(encoder=False)` writes (a sample's members
    sorted by name, mode 0o444, fixed mtime and owner, `tarfile`'s default format), with the
    headers `tarfile` makes (`_header`); importing webdataset imports torch, seconds of CPU in
    every cleaning worker. Each member is one write: header, data and padding.
    """

    def __init__(self, fileobj=None):
        self._buf = io.BytesIO() if fileobj is None else None
        self._out = self._buf if fileobj is None else fileobj
        self._offset = 0

    def add(self, sample: dict[str, Any]) -> tuple[int, int]:
        start, key = self._offset, sample["__key__"]
        for name in sorted(n for n in sample if not n.startswith("_")):
            data = sample[name]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"member {name!r} of {key!r} is {type(data).__name__}, not bytes")
            size = memoryview(data).nbytes
            member = b"".join((_header(f"{key}.{name}", size), data, bytes(padded(size) - size)))
            self._out.write(member)
            self._offset += len(member)
        return start, self._offset - start

    def finish(self) -> int:
        return self._offset

    def getvalue(self) -> bytes:
        return self._buf.getvalue()


# A ustar header is fixed but for its name, size and checksum: what `tarfile` writes for a member
# of ours whose name is ASCII and fits its 100 bytes (no pax header), built here from its parts
# (`tarfile`'s own took ~0.11 ms of a photo's ~4.1, these ~0.03: `bench/ingest_profile.py`).
_HEAD_MID = b"0000444\0" + b"0000000\0" * 2  # mode, uid, gid
_HEAD_END = (b"%011o\0" % TAR_MTIME + b" " * 8 + tarfile.REGTYPE + bytes(100) + tarfile.POSIX_MAGIC
             + TAR_OWNER.encode().ljust(32, b"\0") * 2 + bytes(8 + 8 + 155 + 12))
_HEAD_SUM = sum(_HEAD_END)  # `head` holds the rest


def _header(name: str, size: int) -> bytes:
    """The header block(s) `tarfile` writes before a member `name` of `size` bytes (mode 0o444,
    TAR_MTIME, TAR_OWNER, the default pax format)."""
    if name.isascii() and len(name) <= 100 and size < 8**11:
        head = name.encode().ljust(100, b"\0") + _HEAD_MID + b"%011o\0" % size
        chksum = _HEAD_SUM + sum(head)
        return head + _HEAD_END[:12] + b"%06o\0" % chksum + _HEAD_END[19:]
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uname = info.gname = TAR_OWNER
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def serialize(sample: dict[str, Any]) -> bytes:
    """One sample's tar members."""
    w = MemberWriter()
    w.add(sample)
    return w.getvalue()


def parse_members(blob: bytes, key: str) -> dict[str, Any]:
    """The sample back from its members: `{"__key__", "<ext>": bytes, ...}`."""
    sample: dict[str, Any] = {"__key__": key}
    with tarfile.open(fileobj=io.BytesIO(blob + archive_end(len(blob))), mode="r:") as tar:
        for info in tar:
            sample[info.name[len(key) + 1 :]] = tar.extractfile(info).read()
    return sample


def with_extra_captions(blob: bytes, key: str, extra: list[str], qa: list[dict] = ()) -> bytes:
    """A staged sample re-serialised with captions (and QA pairs) merged in from its exact duplicates."""
    sample = parse_members(blob, key)
    doc = json.loads(sample["json"])
    doc["captions"] = doc["captions"] + extra
    doc["qa"] = doc.get("qa", []) + list(qa)
    sample["json"] = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    return serialize(sample)


def plan_shards(rows: list[dict], extra: dict[str, list[str]], max_samples: int, max_bytes: int) -> list[dict]:
    """Rows (accounting rows, input order) -> shard plans `{"split", "index", "path", "members"}`."""
    plans: list[dict] = []
    for split in SPLITS:
        members: list[dict] = []
        size = 0
        for row in (r for r in rows if r["split"] == split):
            merged, qa = extra.get(row["key"], []), row.get("merged_qa") or []  # see dedup.py
            # merged captions and QA pairs grow the json member by at most their JSON text, padded
            nbytes = row["nbytes"] + sum(padded(len(json.dumps(x, ensure_ascii=False).encode())) for x in (merged, qa) if x)
            if members and (len(members) >= max_samples or archive_bytes(size + nbytes) > max_bytes):
                plans.append(_plan(split, len([p for p in plans if p["split"] == split]), members))
                members, size = [], 0
            members.append({"key": row["key"], "file": row["stage_file"], "offset": row["stage_offset"],
                            "length": row["nbytes"], "extra": merged, "qa": qa})
            size += nbytes
        if members:
            plans.append(_plan(split, len([p for p in plans if p["split"] == split]), members))
    return plans


def _plan(split: str, index: int, members: list[dict]) -> dict:
    return {"split": split, "index": index, "path": shard_path(split, index), "members": members}


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def _pieces(members: list[dict]):
    """The planned samples in plan order, as few pieces as possible: `(file, start, end)` for
    staged bytes copied as they are, or a member dict for a sample whose captions a duplicate
    merged into (re-serialised). Samples staged back to back in one file (the usual case: a
    split's samples in input order) make one piece, so a shard is a few large copies."""
    run = None
    for m in members:
        if not _is_merged(m) and run and run[0] == m["file"] and run[2] == m["offset"]:
            run = (run[0], run[1], m["offset"] + m["length"])
            continue
        if run:
            yield run
            run = None
        if _is_merged(m):
            yield m
        else:
            run = (m["file"], m["offset"], m["offset"] + m["length"])
    if run:
        yield run


def _is_merged(m: dict) -> bool:
    return bool(m["extra"] or m.get("qa"))


def _merged(m: dict, staged: memoryview) -> bytes:
    blob = bytes(staged[m["offset"] : m["offset"] + m["length"]])
    return with_extra_captions(blob, m["key"], m["extra"], m.get("qa", []))


def _run(data: memoryview, file: str, start: int, end: int) -> memoryview:
    """Bytes [start, end) of a staging file's `data`; a file cut short is an error, never a short shard."""
    if len(data) < end:
        raise OSError(errno.EIO, f"staging file {file} has {len(data)} bytes, the plan needs {end}")
    return data[start:end]


def _member_blobs(members: list[dict]):
    """The shard's member bytes in order, through fsspec (any storage). Holds one staging file
    at a time."""
    current, data = None, memoryview(b"")
    for piece in _pieces(members):
        file = piece["file"] if isinstance(piece, dict) else piece[0]
        if file != current:
            fs, path = get_fs(file)
            with fs.open(path, "rb") as f:
                data = memoryview(f.read())
            current = file
        yield _merged(piece, data) if isinstance(piece, dict) else _run(data, *piece)


def _copy_range(src: int, dst: int, start: int, end: int, view: memoryview) -> None:
    """Append bytes [start, end) of file `src` to `dst`: in the kernel (copy_file_range: the
    bytes never pass through this process) where the file systems allow, else written from `view`."""
    pos = start
    try:
        while pos < end:
            n = os.copy_file_range(src, dst, end - pos, pos)
            if n == 0:
                raise OSError(errno.EIO, f"staging file ends at {pos}, before {end}")
            pos += n
    except OSError as e:
        if e.errno not in _NO_COPY_RANGE or pos != start:
            raise
        _FdFile(dst).write(view)  # refused here (other file systems, old kernels): copy through memory


# copy_file_range is refused across file systems or where a file system does not implement it
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


class _Staged:
    """One staging file at a time, open and mapped read-only (hashing reads the page cache)."""

    def __init__(self):
        self.file, self.fd, self.map = None, -1, None

    def open(self, file: str) -> memoryview:
        if file != self.file:
            self.close()
            self.fd = os.open(get_fs(file)[1], os.O_RDONLY)
            self.file, self.map = file, mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        return memoryview(self.map)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            os.close(self.fd)
        self.file, self.fd, self.map = None, -1, None


def _write_local(plan: dict, dst: int) -> _HashingWriter:
    """Write the shard's members to the open local file `dst`: staged runs hashed through a map
    of their staging file and copied in the kernel, merged samples re-serialised."""
    out, staged = _HashingWriter(_FdFile(dst)), _Staged()
    try:
        for piece in _pieces(plan["members"]):
            if isinstance(piece, dict):
                with staged.open(piece["file"]) as view:
                    out.write(_merged(piece, view))
                continue
            file, start, end = piece
            with staged.open(file) as view, _run(view, file, start, end) as chunk:
                out.sha.update(chunk)
                out.bytes += len(chunk)
                _copy_range(staged.fd, dst, start, end, chunk)
    finally:
        staged.close()
    return out


class _FdFile:
    """`write` on a raw file descriptor, whole buffers only."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)


def write_shard(plan: dict, version_dir: str) -> dict[str, Any]:
    """Write one planned shard; returns its manifest entry `{"path", "samples", "bytes", "sha256"}`.

    Local version and staging files take a fast path (kernel copies, hashing through a memory
    map: no copy of the bytes in this process); any other storage goes through fsspec.
    """
    final = join(version_dir, plan["path"])
    fs, path = get_fs(final)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    partial = f"{path}{PARTIAL_SUFFIX}"
    if not is_remote(final) and not any(is_remote(m["file"]) for m in plan["members"]):
        dst = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            out = _write_local(plan, dst)
            out.write(archive_end(out.bytes))
        finally:
            os.close(dst)
    else:
        with fs.open(partial, "wb") as f:
            out = _HashingWriter(f)
            for blob in _member_blobs(plan["members"]):
                out.write(blob)
            out.write(archive_end(out.bytes))
    fs.mv(partial, path)
    return {"path": plan["path"], "samples": len(plan["members"]), "bytes": out.bytes, "sha256": out.sha.hexdigest()}
