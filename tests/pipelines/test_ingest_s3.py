"""Ingest from and to object storage: `s3://` URIs against a real S3 API (moto's server)."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest

from pipelines.config import load_config
from pipelines.core.dataset import SPLITS, read_manifest, read_report, read_shard, shard_paths
from pipelines.ingest import ingest
from pipelines.ingest.inspection import inspect_version, validate_version

pytestmark = pytest.mark.timeout(600)

CFG = load_config("debug").data


def _samples(version_dir) -> dict[str, dict]:
    """key -> (split, decoded json), read through webdataset's tar reader (fsspec streams)."""
    out = {}
    for split in SPLITS:
        for url in shard_paths(version_dir, split):
            for s in read_shard(url):
                out[s["__key__"]] = {"split": split, **json.loads(s["json"])}
    return out


def _same_samples(version_dir, reference) -> None:
    got, want = _samples(version_dir), _samples(reference)
    assert set(got) == set(want)
    for key, doc in want.items():
        assert (got[key]["split"], got[key]["captions"], got[key]["qa"]) == (doc["split"], doc["captions"], doc["qa"])


def test_s3_source_into_local_and_s3_versions(ray_s3, s3_server, tiny_source, tiny_dataset, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.mkdir("ingest")
    fs.put(f"{tiny_source}/", "ingest/src/", recursive=True)
    assert fs.isfile("ingest/src/samples.jsonl") and len(fs.ls("ingest/src/images")) == 160
    want = read_report(tiny_dataset)

    local = ingest("s3://ingest/src", tmp_path / "out", CFG)
    report = read_report(local)
    assert (report["seen"], report["kept"], report["rejected"]) == (want["seen"], want["kept"], want["rejected"])
    assert read_manifest(local)["inputs"][0]["files"] == 161  # remote inputs fingerprinted by ETag
    _same_samples(local, tiny_dataset)

    remote = ingest("s3://ingest/src", "s3://ingest/versions", CFG)
    assert str(remote) == f"s3://ingest/versions/{local.name}"  # same inputs + config: same version id
    assert read_report(remote)["kept"] == want["kept"]
    manifest = read_manifest(remote)
    for entry in (e for split in SPLITS for e in manifest["splits"][split]):
        data = fs.cat_file(f"ingest/versions/{local.name}/{entry['path']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
    assert not fs.find("ingest/versions/_staging") and not (tmp_path / "out" / "_staging").exists()
    assert not [p for p in fs.find("ingest/versions") if p.endswith(".partial")]
    _same_samples(remote, tiny_dataset)
    checked = validate_version(str(remote))  # `mmfusion data validate` on object storage
    assert checked["ok"], checked["problems"]
    assert checked["samples"] == want["kept"]
    summary = inspect_version(str(remote))
    assert summary["kept"] == want["kept"] and summary["examples"]

    # An existing version on object storage is never rewritten.
    stamps = {p: i["LastModified"] for p, i in fs.find("ingest/versions", detail=True).items()}
    assert ingest("s3://ingest/src", "s3://ingest/versions", CFG) == remote
    fs.invalidate_cache()
    assert stamps == {p: i["LastModified"] for p, i in fs.find("ingest/versions", detail=True).items()}


def test_missing_s3_source_is_a_clear_error(s3_server):
    fsspec.filesystem("s3").mkdir("empty")
    with pytest.raises(FileNotFoundError, match="source s3://empty/nothing does not exist"):
        ingest("s3://empty/nothing", "s3://empty/versions", CFG)
