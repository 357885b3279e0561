"""Image folders with sidecars: `x.jpg` + `x.txt` (one caption a line) and/or `x.json`
(`{"captions" | "caption", "qa", "meta", "id"}`)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pipelines.core.storage import IMAGE_SUFFIXES, get_fs
from pipelines.ingest.sources.common import as_list, make_ref, reject_ref

SIDECARS = (".txt", ".json")


def _read_sidecars(fs, stem_path: str, names: set[str]) -> dict:
    """Captions/qa/meta from the sidecars that exist; raises ValueError(reason, detail)."""
    out: dict = {"captions": [], "qa": [], "meta": {}}
    if stem_path + ".txt" in names:
        raw = fs.cat_file(stem_path + ".txt")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError("invalid_encoding", f"{stem_path}.txt is not UTF-8 ({e.reason})") from e
        out["captions"] += [line for line in text.splitlines() if line.strip()]
    if stem_path + ".json" in names:
        try:
            obj = json.loads(fs.cat_file(stem_path + ".json").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError("malformed_json", f"{stem_path}.json: {e}") from e
        if not isinstance(obj, dict):
            raise ValueError("malformed_json", f"{stem_path}.json must hold an object")
        out["captions"] += as_list(obj.get("captions", obj.get("caption")))
        out["qa"] += as_list(obj.get("qa"))
        out["meta"] = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        out["id"] = obj.get("id")
    return out


def list_folder(source: str) -> Iterator[dict]:
    """One Ref per file that is not a sidecar; files with no sidecar are rejects."""
    fs, root = get_fs(source)
    names = set(fs.find(root))
    prefix = source[: len(source) - len(root)] if source.endswith(root) else ""
    for path in sorted(names):
        rel = path[len(root):].lstrip("/")
        stem_path, dot, ext = path.rpartition(".")
        if not dot or "/" in ext:
            stem_path, ext = path, ""
        if f".{ext.lower()}" in SIDECARS and any(stem_path + e in names for e in IMAGE_SUFFIXES):
            continue  # a sidecar of an image
        if f".{ext.lower()}" in SIDECARS or rel.startswith(".") or rel.split("/")[-1].startswith("."):
            continue  # a stray sidecar / hidden file, not an input sample
        sid = rel.rpartition(".")[0] if dot else rel
        try:
            side = _read_sidecars(fs, stem_path, names)
        except ValueError as e:
            yield reject_ref(sid, e.args[0], e.args[1], source)
            continue
        if not side["captions"] and not side["qa"]:
            yield reject_ref(sid, "no_captions", f"{prefix}{path}: no .txt/.json sidecar with captions", source)
            continue
        loc = {"kind": "path", "uri": prefix + path}
        yield make_ref(side.get("id") or sid, loc, side["captions"], side["qa"], {**side["meta"], "file": rel}, source)

