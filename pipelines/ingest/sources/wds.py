"""Existing WebDataset tars, re-cleaned and re-sharded.

The driver lists each tar's members (headers only, plus the small text/json members); image
bytes stay in the tar and workers read them by byte range, so nothing large is held here.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator

from pipelines.core.storage import IMAGE_SUFFIXES, get_fs
from pipelines.ingest.sources.common import AUDIO_SUFFIXES, as_list, find_files, make_ref, reject_ref

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


TEXT_MAX_BYTES = 16 << 20  # a text member larger than this is not a caption file: the sample is rejected


class _Scan:
    """What one pass over a tar's headers found: samples (key -> members), repeated members (a
    second sample under `key#n`), and where the tar stopped being readable."""

    def __init__(self, uri: str):
        self.uri = uri
        self.samples: dict[str, dict] = {}
        self.repeats: dict[str, str] = {}  # `key#n` -> key: members whose names were seen before
        self.last_key: str | None = None  # the sample of the last member read
        self.problem = ""  # why the tar is unreadable after some point ("" when it ended cleanly)
        self.reason = "truncated_tar"  # or corrupt_tar: a bad header before the file's end

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        key, ext = _split_name(m.name)
        slot, n = key, 1
        while ext in self.samples.get(slot, {}):  # a repeated name: never overwrite the first
            n += 1
            slot = f"{key}#{n}"
            self.repeats[slot] = key
        self.last_key = slot
        entry = self.samples.setdefault(slot, {})
        if ext not in _TEXT_MEMBERS:
            entry[ext] = (m.offset_data, m.size)
        elif m.size > TEXT_MAX_BYTES:
            entry["_too_large"] = f"{m.name} has {m.size} bytes (text members over {TEXT_MAX_BYTES} are refused)"
        else:
            entry[ext] = tar.extractfile(m).read()


def _ends_cleanly(f, offset: int) -> bool:
    """A tar ends with a zero block where the reader stopped; a cut file or a corrupt header does not."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def _scan(uri: str) -> _Scan:
    """Every member header of a tar, and the small text members. A tar cut short or corrupt in
    the middle keeps what was read before the damage (`problem` says where it stopped)."""
    fs, path = get_fs(uri)
    scan = _Scan(uri)
    with fs.open(path, "rb") as f:
        size = fs.size(path)
        tar = tarfile.open(fileobj=f, mode="r:")
        while True:
            try:
                m = tar.next()
                if m is None:
                    if not _ends_cleanly(f, tar.offset):
                        scan.problem = f"no readable tar header at byte {tar.offset} of {size}"
                        scan.reason = "truncated_tar" if tar.offset + tarfile.BLOCKSIZE > size else "corrupt_tar"
                    break
                if m.offset_data + m.size > size:
                    scan.last_key = _split_name(m.name)[0]
                    scan.problem = f"member {m.name!r} needs bytes up to {m.offset_data + m.size}; the file has {size}"
                    break
                if m.isfile():
                    scan.add(tar, m)
            except (tarfile.TarError, OSError, EOFError) as e:
                scan.problem = f"unreadable after byte {tar.offset} of {size}: {e}"
                break
    return scan


def _ref(key: str, entry: dict, uri: str) -> dict:
    image_ext = next((e for e in entry if f".{e}" in IMAGE_SUFFIXES), None)
    audio_ext = next((e for e in entry if f".{e}" in AUDIO_SUFFIXES), None)  # a version's `flac`
    if image_ext is None and audio_ext is None:
        return reject_ref(key, "missing_image", f"{uri}: sample {key} has no image or audio member", uri)
    loc, audio = ({"kind": "tar", "uri": uri, "offset": entry[e][0], "size": entry[e][1]} if e else None
                  for e in (image_ext, audio_ext))
    try:
        obj = json.loads(entry["json"].decode("utf-8")) if "json" in entry else {}
        text = next((entry[e].decode("utf-8") for e in ("txt", "caption", "cap") if e in entry), "")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return reject_ref(key, "malformed_json" if "json" in entry else "invalid_encoding", f"{uri}: {key}: {e}", uri)
    obj = obj if isinstance(obj, dict) else {}
    captions = as_list(obj.get("captions")) or ([text] if text else [])
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    qa = [{**p, "audio": {"kind": "tar", "uri": uri, "offset": entry[p["audio"]][0], "size": entry[p["audio"]][1]}}
          if isinstance(p, dict) and isinstance(p.get("audio"), str) and p["audio"] in entry else p
          for p in as_list(obj.get("qa"))]  # a spoken question: its member (`q0.flac`) in this tar
    return make_ref(obj.get("id") or key, loc, captions, qa, {**meta, "tar_key": key}, uri, audio=audio)


def _refs_of(scan: _Scan) -> Iterator[dict]:
    """Refs of a scanned tar: its samples; repeated members, the sample the damage cut into and
    the unreadable rest of a damaged tar are rejects."""
    uri = scan.uri
    cut = scan.last_key if scan.problem else None
    for key in sorted(scan.samples):
        entry = scan.samples[key]
        if key in scan.repeats:
            names = ", ".join(f"{scan.repeats[key]}.{e}" for e in sorted(entry))
            yield reject_ref(f"{uri}#{key}", "duplicate_member",
                             f"{uri}: member(s) {names} repeat names seen earlier in the tar; the first are kept", uri)
        elif key == cut:
            yield reject_ref(key, scan.reason, f"{uri}: sample {key} may be incomplete: {scan.problem}", uri)
        elif "_too_large" in entry:
            yield reject_ref(key, "too_large", f"{uri}: {entry['_too_large']}", uri)
        else:
            yield _ref(key, entry, uri)
    if cut is not None and cut not in scan.samples:
        yield reject_ref(cut, scan.reason, f"{uri}: sample {cut} is cut off: {scan.problem}", uri)
    if scan.problem:
        yield reject_ref(f"{uri}#rest", scan.reason,
                         f"{uri}: {scan.problem}; any samples after that point are lost (count unknown)", uri)


def list_webdataset(source: str) -> Iterator[dict]:
    for uri in tar_files(source):
        try:
            scan = _scan(uri)
        except (tarfile.TarError, OSError) as e:
            yield reject_ref(uri, "corrupt_tar", f"{uri}: {e}", uri)
            continue
        yield from _refs_of(scan)
