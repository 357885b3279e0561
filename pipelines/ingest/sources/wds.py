"""Existing WebDataset tars, re-cleaned and re-sharded.

The driver lists each tar's members (headers only, plus the small text/json members); image
bytes stay in the tar and workers read them by byte range, so nothing large is held here.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator

from pipelines.core.storage import IMAGE_SUFFIXES, get_fs
from pipelines.ingest.sources.common import as_list, find_files, make_ref, reject_ref

_TEXT_MEMBERS = ("json", "txt", "caption", "cap")


def tar_files(source: str) -> list[str]:
    fs, path = get_fs(source)
    if fs.isfile(path):
        return [source]
    found = find_files(source, ".tar")
    if not found:
        raise FileNotFoundError(f"{source}: no *.tar shards in this folder or below")
    return found


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _scan(uri: str) -> dict[str, dict]:
    """key -> {ext: (offset, size) for images, decoded text for small text members}."""
    fs, path = get_fs(uri)
    samples: dict[str, dict] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            entry = samples.setdefault(key, {})
            if ext in _TEXT_MEMBERS:
                entry[ext] = tar.extractfile(m).read()
            else:
                entry[ext] = (m.offset_data, m.size)
    return samples


def _ref(key: str, entry: dict, uri: str) -> dict:
    image_ext = next((e for e in entry if f".{e}" in IMAGE_SUFFIXES), None)
    if image_ext is None:
        return reject_ref(key, "missing_image", f"{uri}: sample {key} has no image member", uri)
    offset, size = entry[image_ext]
    loc = {"kind": "tar", "uri": uri, "offset": offset, "size": size}
    try:
        obj = json.loads(entry["json"].decode("utf-8")) if "json" in entry else {}
        text = next((entry[e].decode("utf-8") for e in ("txt", "caption", "cap") if e in entry), "")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return reject_ref(key, "malformed_json" if "json" in entry else "invalid_encoding", f"{uri}: {key}: {e}", uri)
    obj = obj if isinstance(obj, dict) else {}
    captions = as_list(obj.get("captions")) or ([text] if text else [])
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return make_ref(obj.get("id") or key, loc, captions, as_list(obj.get("qa")), {**meta, "tar_key": key}, uri)


def list_webdataset(source: str) -> Iterator[dict]:
    for uri in tar_files(source):
        try:
            samples = _scan(uri)
        except (tarfile.TarError, OSError) as e:
            yield reject_ref(uri, "corrupt_tar", f"{uri}: {e}", uri)
            continue
        for key in sorted(samples):
            yield _ref(key, samples[key], uri)
