"""The project's raw JSONL: one `{"id", "image", "audio", "captions", "qa", "meta"}` object per line
(`image` and/or `audio`: a path relative to the file, an absolute path or a URL; a QA pair's
`audio` is its question spoken)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pipelines.core.storage import get_fs, join
from pipelines.ingest.sources.common import as_list, image_loc, make_ref, parent_of, reject_ref


def jsonl_files(source: str) -> list[str]:
    fs, path = get_fs(source)
    if fs.isfile(path):
        return [source]
    found = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(join(path, "*.jsonl")))
    if not found:
        raise FileNotFoundError(f"{source}: no *.jsonl file in this folder")
    return [join(source, name) for name in found]


def parse_line(raw: bytes, where: str, base: str, source: str) -> dict:
    """One line -> a Ref (a reject Ref for bad encoding, bad JSON or missing fields)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return reject_ref(where, "invalid_encoding", f"{where}: not UTF-8 ({e.reason})", source)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return reject_ref(where, "malformed_json", f"{where}: {e.msg} at column {e.colno}", source)
    if not isinstance(obj, dict):
        return reject_ref(where, "malformed_json", f"{where}: a line must be a JSON object", source)
    missing = [] if obj.get("id") else ["id"]
    if not obj.get("image") and not obj.get("audio"):
        missing.append("image (or audio)")
    if not obj.get("captions") and not obj.get("caption") and not obj.get("qa"):
        missing.append("captions")
    if missing:
        return reject_ref(obj.get("id") or where, "missing_field", f"{where}: missing {', '.join(missing)}", source)
    for field in ("image", "audio"):
        if obj.get(field) and not isinstance(obj[field], str):
            return reject_ref(obj["id"], "bad_field_type",
                              f"{where}: '{field}' must be a path or URL string, not {type(obj[field]).__name__}",
                              source)
    captions = as_list(obj.get("captions", obj.get("caption")))
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    image = image_loc(obj["image"], base) if obj.get("image") else None
    audio = image_loc(obj["audio"], base) if obj.get("audio") else None
    return make_ref(obj["id"], image, captions, _spoken_qa(as_list(obj.get("qa")), base), meta, source, audio=audio)


def _spoken_qa(qa: list, base: str) -> list:
    """QA pairs whose `audio` (the question spoken) names a file: that name as a locator."""
    return [{**pair, "audio": image_loc(pair["audio"], base)}
            if isinstance(pair, dict) and isinstance(pair.get("audio"), str) and pair["audio"].strip() else pair
            for pair in qa]


def list_jsonl(source: str) -> Iterator[dict]:
    for uri in jsonl_files(source):
        fs, path = get_fs(uri)
        base = parent_of(uri)
        with fs.open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, not data
                if raw.strip():
                    yield parse_line(raw.strip(), f"{uri}:{lineno}", base, uri)
