"""The dataset version: its layout on disk or object storage, its manifest, its shards.

```
<root>/<version>/manifest.json     written last: its presence marks the version complete
<root>/<version>/report.json       counts: seen, kept, rejected by reason, duplicates
<root>/<version>/rejects.jsonl     one line per dropped input, with its reason
<root>/<version>/{train,val,test}/shard-000000.tar
<root>/<version>/tokenizer/        the version's WordPiece tokenizer, trained by ingest on its
                                   train split; each file's sha256 in the manifest's `tokenizer`
<root>/_index/<key>.json          a listing (names, sizes, mtimes) that made a version: see ingest/driver.py
<root>/_staging/<key>/            cleaned samples of a running ingest (removed when it ends)
```
Paths may be local or any fsspec URI (`s3://...`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

from pipelines.core.storage import exists, get_fs, join, read_json

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
REPORT = "report.json"
REJECTS = "rejects.jsonl"
SHARD_NAME = "shard-{index:06d}.tar"
STAGING_DIR = "_staging"
INDEX_DIR = "_index"
TOKENIZER_DIR = "tokenizer"


class DatasetError(ValueError):
    """A dataset version that cannot be used as it is; the message names the file and the fix."""


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index=index)


def shard_path(split: str, index: int) -> str:
    """A shard's path inside its version (`train/shard-000000.tar`): a manifest entry's `path`."""
    return f"{split}/{shard_name(index)}"


def entries_by_split(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Shard entries (`{"path": shard_path(...), ...}`, in any split order) grouped by split, each
    split present, entries kept in order: the manifest's `splits` as ingest writes it."""
    return {split: [e for e in entries if e["path"].startswith(f"{split}/")] for split in SPLITS}


def is_complete(version_dir: str | os.PathLike) -> bool:
    return exists(join(version_dir, MANIFEST))


def read_manifest(version_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete version; a clear error when the directory is not one."""
    uri = join(version_dir, MANIFEST)
    fs, path = get_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"{version_dir} is not a complete dataset version (no {MANIFEST}). Pass the directory "
            "printed by `mmfusion data ingest`, or re-run the ingest to complete it."
        )
    return read_json(uri)


def read_report(version_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(join(version_dir, REPORT))


def shard_paths(version_dir: str | os.PathLike, split: str) -> list[str]:
    """Paths (or URIs) of the finished shards of one split, in order, from the manifest."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [join(version_dir, entry["path"]) for entry in split_entries(read_manifest(version_dir), split)]


def all_split_entries(manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """`{split: entries}` for every split the manifest lists; an entry is a shard's
    `{"path", "samples", "bytes", "sha256"}`, in shard order."""
    return {split: list(entries) for split, entries in manifest["splits"].items()}


def split_entries(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The manifest's shard entries of one split (none when the split is empty)."""
    return all_split_entries(manifest).get(split, [])


def version_id(version_dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> str:
    """The dataset version id: the manifest's, else the directory's name."""
    manifest = read_manifest(version_dir) if manifest is None else manifest
    return str(manifest.get("version") or manifest.get("version_id") or Path(str(version_dir)).name)


def benchmark_id(version_dir: str | os.PathLike, protocol: dict[str, Any] | None = None) -> tuple[str, str]:
    """`(dataset version, benchmark id)`: the id is the version plus a hash of the test shards'
    sha256s from the manifest and of the evaluation `protocol` (the settings and metric code
    that turn outputs into numbers, `pipelines.evaluate.eval_protocol`), so it names exactly the
    bytes every model is scored on and how: two reports with the same id are comparable."""
    manifest = read_manifest(version_dir)
    version = version_id(version_dir, manifest)
    shas = sorted(str(e.get("sha256") or e["path"]) for e in split_entries(manifest, "test"))
    if protocol is not None:
        shas.append("protocol " + json.dumps(protocol, sort_keys=True))
    digest = hashlib.sha256("\n".join(shas).encode()).hexdigest()[:12]
    return version, f"{version}:test-{digest}"


# ----------------------------------------------------------------------------- reading shards


def open_shard(url: str):
    """A binary stream for a local path, `file://`, `pipe:`/`http(s)://` (webdataset's gopen),
    or any fsspec URI such as `s3://bucket/x.tar` (object storage)."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file", "pipe", "http", "https") or len(scheme) == 1:  # len 1: C:\ paths
        import webdataset as wds

        return wds.gopen(url, "rb")
    return fsspec.open(url, "rb").open()


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard: `{"__key__", "jpg": bytes, "txt": bytes, "json": bytes}`."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_shard(url)
    try:
        files = tar_file_expander([{"url": url, "stream": stream}])
        for sample in group_by_keys(files):
            sample.pop("__url__", None)
            sample.pop("__local_path__", None)
            yield sample
    finally:
        stream.close()


def sample_texts(urls: list[str], limit: int | None = None) -> Iterator[str]:
    """Every caption, question and answer in the shards (for training a tokenizer); no images decoded."""
    from mmcore.data import parse_sample

    for count, raw in enumerate(s for url in urls for s in read_shard(url)):
        if limit is not None and count >= limit:
            return
        sample = parse_sample(raw)
        yield from texts_of(sample.captions, sample.qa)


def texts_of(captions: list[str], qa: list[dict]) -> Iterator[str]:
    """One sample's texts for a tokenizer: its captions, then each QA pair's question and answers."""
    yield from captions
    for pair in qa:
        yield pair.get("question", "")
        yield from pair.get("answers", [])


def tokenizer_files(manifest: dict[str, Any]) -> dict[str, str]:
    """The version's tokenizer files (name -> sha256) as its manifest lists them; `{}` for a
    version ingested before versions carried their tokenizer."""
    return dict((manifest.get("tokenizer") or {}).get("files", {}))


def fetch_tokenizer(version_dir: str | os.PathLike, local_dir: str | os.PathLike) -> Path | None:
    """The version's `tokenizer/` as a local folder whose every file matches its sha256 in the
    manifest: the version's own folder when local, else a copy in `local_dir`. None when the
    version has no tokenizer; `DatasetError` naming the file when one is missing or altered."""
    from pipelines.core.storage import as_path, is_remote, sha256_file

    files = tokenizer_files(read_manifest(version_dir))
    if not files:
        return None
    source = join(version_dir, TOKENIZER_DIR)
    folder = Path(local_dir) if is_remote(str(version_dir)) else Path(as_path(source))
    for name, digest in files.items():
        if is_remote(str(version_dir)) and not (folder / name).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            fs, path = get_fs(join(source, name))
            fs.get_file(path, str(folder / name))
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise DatasetError(
                f"{join(source, name)} is missing or does not match its sha256 in {MANIFEST} ({digest[:12]}...): "
                "the dataset version is damaged. Re-run the ingest into a new root, or restore the file."
            )
    return folder
