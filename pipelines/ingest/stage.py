"""The streaming map of an ingest: one Ref in, one small accounting row out.

Runs inside Ray Data workers. For each Ref it cleans the text, fetches and cleans the image, and
assigns the split; kept samples are serialised as their final tar members into a staging file per
batch and split (named by the batch's first input position, so a retried task rewrites the same
file), and only the small accounting row (key, reason, hashes, where staged) flows back to the
driver. Writing the shards later copies those bytes (`shards.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import pyarrow as pa

from pipelines.config import DataConfig
from pipelines.ingest.fetch import FetchError, fetch
from pipelines.ingest.imageclean import ImageReject, ImageSpec, clean_image
from pipelines.ingest.layout import is_remote, join, open_atomic
from pipelines.ingest.shards import MemberWriter
from pipelines.ingest.textclean import clean_captions, clean_qa
from pipelines.runtime import quiet_loggers

META_FIELDS = ("order", "key", "id", "reason", "detail", "source", "image", "split", "phash",
               "pixel_sha", "caption_sha", "nbytes", "stage_file", "stage_offset", "captions", "dropped",
               "file_sha")


def split_of(key: str, fractions: dict[str, float]) -> str:
    """The split is a function of the key alone: stable when data is added."""
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:15], 16) / 16**15
    total = sum(fractions.values())
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac / total
        if u < acc:
            return name
    return list(fractions)[-1]


def image_spec(cfg: DataConfig) -> ImageSpec:
    return ImageSpec(cfg.image_size, cfg.resize_mode, cfg.jpeg_quality, cfg.min_side, cfg.max_aspect, cfg.max_pixels)


def _row(ref: dict, reason: str = "", detail: str = "", **kw: Any) -> dict:
    loc = ref.get("image") or {}
    row = {"order": ref["order"], "key": ref["key"], "id": ref.get("id") or "", "reason": reason,
           "detail": detail[:500], "source": ref.get("source", ""), "image": loc.get("uri", ""),
           "split": "", "phash": "", "pixel_sha": "", "caption_sha": "", "nbytes": 0,
           "stage_file": "", "stage_offset": -1, "captions": "[]", "dropped": "[]", "file_sha": ""}
    row.update(kw)
    return row


def process_ref(ref: dict, cfg: DataConfig, hash_files: bool = False) -> tuple[dict, dict | None]:
    """(accounting row, staged sample or None) for one Ref; never raises for bad data.

    With `hash_files`, a whole local image file read here also gets its sha256 (`file_sha`): the
    driver's content fingerprint then need not read it again (`fingerprint.py`).
    """
    if ref.get("reject"):
        return _row(ref, ref["reject"], ref.get("detail", "")), None
    captions, dropped = clean_captions(ref["captions"], cfg.min_caption_chars, cfg.max_caption_chars)
    qa, qa_dropped = clean_qa(ref["qa"], cfg.max_caption_chars)
    if not captions and not qa:
        return _row(ref, dropped[0] if dropped else "no_captions", "no usable caption or QA pair"), None
    if not ref.get("image"):
        return _row(ref, "missing_field", "no image"), None
    loc = ref["image"]
    try:
        data = fetch(loc, cfg.http_timeout_s, cfg.http_retries)
    except FetchError as e:
        return _row(ref, e.reason, e.detail), None
    whole_local_file = loc["kind"] == "path" and not is_remote(loc["uri"])
    file_sha = hashlib.sha256(data).hexdigest() if hash_files and whole_local_file else ""
    try:
        img = clean_image(data, image_spec(cfg))
    except ImageReject as e:
        return _row(ref, e.reason, e.detail, file_sha=file_sha), None
    split = split_of(ref["key"], cfg.split_fractions)
    doc = {"id": ref["id"], "captions": captions, "qa": qa, "split": split, "source": ref["source"],
           "width": img.width, "height": img.height, "meta": {**ref["meta"], "format": img.format}}
    doc_text, txt = json.dumps(doc, ensure_ascii=False), (captions[0] if captions else "")
    staged = {"__key__": ref["key"], "jpg": img.jpeg, "txt": txt.encode("utf-8"), "json": doc_text.encode("utf-8")}
    row = _row(ref, split=split, phash=f"{img.phash:016x}", pixel_sha=img.pixel_sha,
               caption_sha=hashlib.sha256("\n".join(sorted(captions)).encode()).hexdigest(),
               captions=json.dumps(captions, ensure_ascii=False), dropped=json.dumps(dropped + qa_dropped),
               file_sha=file_sha)
    return row, staged


def process_batch(batch: pa.Table, cfg_dict: dict, staging_dir: str, hash_files: bool = False) -> pa.Table:
    """Ray Data `map_batches` fn: a table of JSON Refs -> a table of accounting rows.

    The kept samples are staged as tar members in one file per split, so that writing a split's
    shards later reads only that split's bytes. `nbytes` is the sample's exact size in a tar.
    """
    quiet_loggers()
    cfg = DataConfig.model_validate(cfg_dict)
    refs = [json.loads(s) for s in batch.column("ref").to_pylist()]
    first = min(r["order"] for r in refs)
    rows, staged = [], {}  # staged: stage file -> its MemberWriter, streaming into the file
    with contextlib.ExitStack() as files:  # each renamed into place when the batch is done
        for ref in refs:
            row, sample = process_ref(ref, cfg, hash_files)
            if sample is not None:
                stage_file = join(staging_dir, f"stage-{first:09d}-{row['split']}.members")
                if stage_file not in staged:
                    staged[stage_file] = MemberWriter(files.enter_context(open_atomic(stage_file)))
                offset, length = staged[stage_file].add(sample)
                row.update(stage_file=stage_file, stage_offset=offset, nbytes=length)
            rows.append(row)
        for writer in staged.values():
            writer.finish()
    return pa.Table.from_pylist(rows)
