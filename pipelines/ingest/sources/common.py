"""What every source reader yields: a `Ref`, a small JSON-able dict pointing at one raw sample.

`{"id", "image": {"kind": "path"|"url"|"tar", "uri", ...} | None, "audio": (the same) | None,
  "captions": [str], "qa": [{"question", "answers"}], "meta": {...}, "source": str,
  "reject": str | None, "detail": str}`; a sample has an image, an audio clip or both. A reader
never raises on a bad record: it yields a Ref with `reject` set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any

from pipelines.core.storage import join

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Files read as audio (by content, through libsndfile; the suffix only says "this is audio").
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".au")


def is_audio_name(name: str) -> bool:
    return text_of(name).strip().lower().endswith(AUDIO_SUFFIXES)


def make_ref(
    id: Any,
    image: dict | None,
    captions: list | None = None,
    qa: list | None = None,
    meta: dict | None = None,
    source: str = "",
    reject: str | None = None,
    detail: str = "",
    audio: dict | None = None,
) -> dict:
    """A Ref; JSON-able whatever the reader found (bytes decoded, other objects made text), and
    a reject (`invalid_encoding`, `invalid_path`) when its id or image path cannot be used."""
    ref = {
        "id": None if id is None else text_of(id),
        "image": jsonable(image),
        "audio": jsonable(audio),
        "captions": jsonable(list(captions or [])),
        "qa": jsonable(list(qa or [])),
        "meta": jsonable(dict(meta or {})),
        "source": text_of(source),
        "reject": reject,
        "detail": detail,
    }
    if not reject:
        problem = _unusable(ref)
        if problem:
            ref.update(image=None, audio=None, captions=[], qa=[], reject=problem[0], detail=problem[1])
            if not is_utf8(json.dumps(ref["meta"], ensure_ascii=False)):
                ref["meta"] = {}
    if ref["id"] is not None and not is_utf8(ref["id"]):
        ref["id"] = safe_text(ref["id"], 10_000)  # written as text (the surrogate escaped), keyed by it
    return ref


def _unusable(ref: dict) -> tuple[str, str] | None:
    """(reason, detail) when a Ref's id or image path cannot be written or opened, else None."""
    if ref["id"] is not None and not is_utf8(ref["id"]):
        return "invalid_encoding", f"id {safe_text(ref['id'])!r} is not valid Unicode (a lone surrogate)"
    for kind in ("image", "audio"):
        uri = (ref[kind] or {}).get("uri", "") if isinstance(ref[kind], dict) else ""
        if not is_utf8(uri):
            return "invalid_path", f"{kind} path {safe_text(uri)!r} is not valid Unicode (a lone surrogate)"
        if "\x00" in uri:
            return "invalid_path", f"{kind} path {safe_text(uri)!r} holds a NUL character"
    if not is_utf8(json.dumps(ref["meta"], ensure_ascii=False)):
        return "invalid_encoding", "a metadata field is not valid Unicode (a lone surrogate)"
    return None


def is_utf8(text: str) -> bool:
    """False for text that cannot be written as UTF-8 (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_text(text: str, limit: int = 200) -> str:
    """Text fit for a report or a log: lone surrogates written as `\\udxxx`, at most `limit` chars."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def text_of(value: Any) -> str:
    """A cell as text: bytes decoded (bad bytes kept as surrogates, rejected later), rest `str`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else str(value)


def jsonable(value: Any) -> Any:
    """`value` with bytes decoded (`text_of`), tuples as lists, keys as text, non-finite floats
    and objects JSON cannot hold as None: a Ref always serialises, and cleaning rejects the Nones."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return text_of(value)
    if isinstance(value, dict):
        return {text_of(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return None


def reject_ref(id: Any, reason: str, detail: str, source: str) -> dict:
    return make_ref(id, None, source=source, reject=reason, detail=detail)


def parent_of(uri: str) -> str:
    """The folder of a manifest, against which its relative image paths resolve: absolute for a
    local file (`raw.jsonl` named bare, in its own folder, is `<cwd>`, not `raw.jsonl`)."""
    if "://" in uri:
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def image_loc(value: str, base: str) -> dict:
    """A locator for an image named in a manifest: URL, fsspec URI, absolute or relative path."""
    value = text_of(value).strip()
    if value.startswith(("http://", "https://")):
        return {"kind": "url", "uri": value}
    if "://" in value or value.startswith("/"):
        return {"kind": "path", "uri": value}
    return {"kind": "path", "uri": join(base, value)}


def as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def key_for(id: str) -> str:
    """A WebDataset-safe key (no dots or slashes) that is a stable function of the id."""
    safe = _UNSAFE.sub("_", id)
    if safe == id and 0 < len(id) <= 64:
        return id
    return f"{safe[:48]}_{hashlib.sha1(id.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def has_surrogates(text: str) -> bool:
    """True when text was decoded with surrogateescape from bytes that were not UTF-8."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def find_files(source: str, suffix: str) -> list[str]:
    """URIs of the files under `source` (recursively) whose names end in `suffix`, sorted."""
    from pipelines.core.storage import get_fs

    fs, root = get_fs(source)
    prefix = source[: len(source) - len(root)] if source.endswith(root) else ""
    if not prefix and "://" in source:
        prefix = source.split("://", 1)[0] + "://"
    return [prefix + p for p in sorted(fs.find(root)) if p.lower().endswith(suffix)]
