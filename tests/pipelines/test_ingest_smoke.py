"""The fixtures other parts rely on: a tiny version with the documented layout and contract."""

from __future__ import annotations

import json

import webdataset as wds

from pipelines.core.dataset import SPLITS, read_manifest, read_report, shard_paths


def test_tiny_dataset_layout_and_sample_contract(tiny_dataset):
    manifest = read_manifest(tiny_dataset)
    report = read_report(tiny_dataset)
    assert report["seen"] == 160
    rejects = (tiny_dataset / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == report["seen"] - report["kept"]  # every input not kept is listed, once
    assert report["kept"] >= 150  # the synthetic set has no defects and no near-copies
    total = 0
    for split in SPLITS:
        paths = shard_paths(tiny_dataset, split)
        assert paths, f"no {split} shards"
        for sample in wds.WebDataset(paths, shardshuffle=False):
            doc = json.loads(sample["json"])
            assert doc["split"] == split
            assert sample["txt"].decode() == doc["captions"][0]
            assert sample["jpg"][:2] == b"\xff\xd8"
            assert {"id", "captions", "qa", "source", "width", "height", "meta"} <= doc.keys()
            total += 1
    assert total == report["kept"] == sum(manifest["counts"].values())
