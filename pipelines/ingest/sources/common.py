"""What every source reader yields: a `Ref`, a small JSON-able dict pointing at one raw sample.

`{"id", "image": {"kind": "path"|"url"|"tar", "uri", ...} | None, "captions": [str],
  "qa": [{"question", "answers"}], "meta": {...}, "source": str, "reject": str | None,
  "detail": str}`. A reader never raises on a bad record: it yields a Ref with `reject` set.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pipelines.core.storage import join

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def make_ref(
    id: Any,
    image: dict | None,
    captions: list | None = None,
    qa: list | None = None,
    meta: dict | None = None,
    source: str = "",
    reject: str | None = None,
    detail: str = "",
) -> dict:
    return {
        "id": None if id is None else str(id),
        "image": image,
        "captions": list(captions or []),
        "qa": list(qa or []),
        "meta": dict(meta or {}),
        "source": source,
        "reject": reject,
        "detail": detail,
    }


def reject_ref(id: Any, reason: str, detail: str, source: str) -> dict:
    return make_ref(id, None, source=source, reject=reason, detail=detail)


def image_loc(value: str, base: str) -> dict:
    """A locator for an image named in a manifest: URL, fsspec URI, absolute or relative path."""
    value = str(value).strip()
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
