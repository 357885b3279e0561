"""Packing kept samples into WebDataset shards and writing one shard atomically.

Shards of a split are filled in input order up to `shard_samples` samples and
`shard_max_bytes` bytes. A shard is written under a `.partial` name and renamed when complete,
so a killed job never leaves a finished-looking shard. Tars are deterministic: fixed mtime,
fixed owner, members of a sample contiguous and sorted (webdataset's TarWriter).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipelines.ingest.layout import PARTIAL_SUFFIX, SPLITS, get_fs, join, shard_name

TAR_MTIME = 946684800  # 2000-01-01: a fixed mtime makes the tar bytes reproducible
_TAR_END = 1024  # two zero blocks
_RECORD = 10240  # tar pads the archive to a multiple of this


def archive_bytes(member_bytes: int) -> int:
    return -(-(member_bytes + _TAR_END) // _RECORD) * _RECORD


def plan_shards(rows: list[dict], extra: dict[str, list[str]], max_samples: int, max_bytes: int) -> list[dict]:
    """Rows (accounting rows, input order) -> shard plans `{"split", "index", "path", "members"}`."""
    plans: list[dict] = []
    for split in SPLITS:
        members: list[dict] = []
        size = 0
        for row in (r for r in rows if r["split"] == split):
            if members and (len(members) >= max_samples or archive_bytes(size + row["nbytes"]) > max_bytes):
                plans.append(_plan(split, len([p for p in plans if p["split"] == split]), members))
                members, size = [], 0
            members.append({"key": row["key"], "file": row["stage_file"], "row": row["stage_row"],
                            "extra": extra.get(row["key"], [])})
            size += row["nbytes"]
        if members:
            plans.append(_plan(split, len([p for p in plans if p["split"] == split]), members))
    return plans


def _plan(split: str, index: int, members: list[dict]) -> dict:
    return {"split": split, "index": index, "path": f"{split}/{shard_name(index)}", "members": members}


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _samples(members: list[dict]):
    """Yield shard samples in plan order, holding one staging file in memory at a time."""
    import pyarrow.parquet as pq

    current, table = None, None
    for m in members:
        if m["file"] != current:
            fs, path = get_fs(m["file"])
            with fs.open(path, "rb") as f:
                table = pq.read_table(f).to_pydict()
            current = m["file"]
        i = m["row"]
        doc = table["json"][i]
        if m["extra"]:
            obj = json.loads(doc)
            obj["captions"] = obj["captions"] + m["extra"]
            doc = json.dumps(obj, ensure_ascii=False)
        yield {"__key__": m["key"], "jpg": table["jpg"][i], "txt": table["txt"][i].encode(), "json": doc.encode()}


def write_shard(plan: dict, version_dir: str) -> dict[str, Any]:
    """Write one planned shard; returns its manifest entry `{"path", "samples", "bytes", "sha256"}`."""
    import webdataset as wds

    final = join(version_dir, plan["path"])
    fs, path = get_fs(final)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    partial = f"{path}{PARTIAL_SUFFIX}"
    with fs.open(partial, "wb") as f:
        out = _HashingWriter(f)
        writer = wds.TarWriter(out, encoder=False, mtime=TAR_MTIME, user="mmfusion", group="mmfusion")
        for sample in _samples(plan["members"]):
            writer.write(sample)
        writer.close()
    fs.mv(partial, path)
    return {"path": plan["path"], "samples": len(plan["members"]), "bytes": out.bytes, "sha256": out.sha.hexdigest()}
