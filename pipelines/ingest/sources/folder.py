"""Image and audio folders with sidecars: `x.jpg` and/or `x.wav` (any of `AUDIO_SUFFIXES`) +
`x.txt` (one caption a line) and/or `x.json` (`{"captions" | "caption", "qa", "meta", "id"}`).
An image and an audio file with the same stem are one sample with both."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pipelines.core.storage import IMAGE_SUFFIXES, get_fs
from pipelines.ingest.sources.common import AUDIO_SUFFIXES, as_list, make_ref, reject_ref

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


def _media(stem_path: str, names: set[str]) -> list[str]:
    """The image and audio files of a stem (what its sidecars belong to)."""
    return [stem_path + e for e in IMAGE_SUFFIXES + AUDIO_SUFFIXES if stem_path + e in names]


def _partner(path: str, stem_path: str, ext: str, names: set[str]) -> tuple[str | None, str | None, bool]:
    """(image, audio, skip) for a media file: an audio file whose stem also has an image is that
    image's sample's audio (skipped here); an image takes its stem's audio file, if any."""
    if f".{ext.lower()}" in AUDIO_SUFFIXES:
        if any(stem_path + e in names for e in IMAGE_SUFFIXES):
            return None, None, True
        return None, path, False
    audio = next((stem_path + e for e in AUDIO_SUFFIXES if stem_path + e in names), None)
    return path, audio, False


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
        if f".{ext.lower()}" in SIDECARS and _media(stem_path, names):
            continue  # a sidecar of an image or audio file
        if f".{ext.lower()}" in SIDECARS or rel.startswith(".") or rel.split("/")[-1].startswith("."):
            continue  # a stray sidecar / hidden file, not an input sample
        image, audio, skip = _partner(path, stem_path, ext, names) if dot else (path, None, False)
        if skip:
            continue
        sid = rel.rpartition(".")[0] if dot else rel
        try:
            side = _read_sidecars(fs, stem_path, names)
        except ValueError as e:
            yield reject_ref(sid, e.args[0], e.args[1], source)
            continue
        if not side["captions"] and not side["qa"]:
            yield reject_ref(sid, "no_captions", f"{prefix}{path}: no .txt/.json sidecar with captions", source)
            continue
        image_loc = {"kind": "path", "uri": prefix + image} if image else None
        audio_loc = {"kind": "path", "uri": prefix + audio} if audio else None
        yield make_ref(side.get("id") or sid, image_loc, side["captions"], side["qa"], {**side["meta"], "file": rel},
                       source, audio=audio_loc)
