"""Source readers: each turns one raw format into a stream of Refs (see `common.py`).

`detect_format(source)` guesses the format; `list_refs(source, fmt, columns)` reads it.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipelines.core.storage import IMAGE_SUFFIXES, get_fs, join, read_json
from pipelines.ingest.sources.coco import list_coco
from pipelines.ingest.sources.common import find_files
from pipelines.ingest.sources.folder import list_folder
from pipelines.ingest.sources.jsonl import list_jsonl
from pipelines.ingest.sources.tabular import list_tabular, tabular_files
from pipelines.ingest.sources.vqa import QUESTIONS_GLOB, list_vqa
from pipelines.ingest.sources.wds import list_webdataset

FORMATS = ("coco", "vqa", "jsonl", "csv", "parquet", "folder", "webdataset")


def _json_kind(uri: str) -> str:
    """COCO captions or VQA, from the structure of one JSON file."""
    data = read_json(uri)
    if isinstance(data, dict) and "questions" in data:
        return "vqa"
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if isinstance(annotations, list) and any(isinstance(a, dict) and "caption" in a for a in annotations[:5]):
        return "coco"
    if isinstance(data, list) and data and isinstance(data[0], dict) and "question" in data[0]:
        return "vqa"
    raise ValueError(f"{uri}: a JSON source must be COCO captions or VQA-style; pass --format")


def detect_format(source: str) -> str:
    """Guess the format of a file or folder; a clear error when it cannot."""
    fs, path = get_fs(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"source {source} does not exist")
    if fs.isfile(path):
        ext = path.lower().rsplit(".", 1)[-1]
        by_ext = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "tar": "webdataset"}
        if ext in by_ext:
            return by_ext[ext]
        if ext == "json":
            return _json_kind(source)
        raise ValueError(f"cannot tell the format of {source}; pass --format ({', '.join(FORMATS)})")
    if fs.glob(join(path, "annotations", "captions_*.json")):
        return "coco"
    if fs.glob(join(path, QUESTIONS_GLOB)):
        return "vqa"  # VQA v2: questions + annotations files beside the COCO image folders
    if fs.exists(join(path, "manifest.json")) and find_files(source, ".tar"):
        return "webdataset"  # an existing dataset version: re-clean and re-shard it
    top = [p.rsplit("/", 1)[-1].lower() for p in fs.ls(path, detail=False)]
    for ext, fmt in (("jsonl", "jsonl"), ("parquet", "parquet"), ("csv", "csv")):
        if any(n.endswith(f".{ext}") for n in top):
            return fmt
    if find_files(source, ".tar"):
        return "webdataset"
    if any(n.endswith(IMAGE_SUFFIXES) for n in top) or fs.find(path):
        return "folder"
    raise ValueError(f"{source} is an empty folder")


def list_refs(source: str, fmt: str, columns: dict[str, str] | None = None) -> Iterator[dict]:
    """All Refs of a source, in a deterministic order."""
    if fmt == "coco":
        yield from list_coco(source)
    elif fmt == "vqa":
        yield from list_vqa(source)
    elif fmt == "jsonl":
        yield from list_jsonl(source)
    elif fmt in ("csv", "parquet"):
        for uri in tabular_files(source, fmt):
            yield from list_tabular(uri, fmt, columns or {})
    elif fmt == "folder":
        yield from list_folder(source)
    elif fmt == "webdataset":
        yield from list_webdataset(source)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
