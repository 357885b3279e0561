"""End-to-end ingests on a real local Ray (one per session): every source format, the
bad-input corpus, HTTP images, real COCO photos, read-back, re-runs and crash recovery."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from ingest_corpus import ImageServer, build_bad_corpus, encode, scene

from pipelines.config import load_config
from pipelines.core.dataset import SPLITS, read_manifest, read_report, shard_paths
from pipelines.ingest import ingest
from pipelines.ingest.inspection import validate_version
from pipelines.ingest.sources import detect_format
from pipelines.ingest.synth import synthesize

CFG = load_config("debug").data


def _samples(version_dir) -> dict[str, dict]:
    """key -> decoded json, read with plain webdataset over every split."""
    out = {}
    for split in SPLITS:
        paths = shard_paths(version_dir, split)
        for s in wds.WebDataset(paths, shardshuffle=False, empty_check=False) if paths else []:
            out[s["__key__"]] = json.loads(s["json"])
    return out


def _check_accounting(version_dir) -> dict:
    report = read_report(version_dir)
    assert len(_samples(version_dir)) == report["kept"]  # counted in the shards, not in the report
    rejects = [json.loads(x) for x in (Path(version_dir) / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == report["seen"] - report["kept"]
    return report


@pytest.fixture(scope="module")
def raw12(tmp_path_factory) -> tuple[Path, list[dict]]:
    src = synthesize(tmp_path_factory.mktemp("raw12"), num=12, seed=3)
    return src, [json.loads(x) for x in (src / "samples.jsonl").read_text().splitlines()]


def test_bad_corpus_rejects_each_case_with_its_reason(ray_local, tmp_path):
    expected = build_bad_corpus(tmp_path / "raw")
    vdir = ingest(tmp_path / "raw", tmp_path / "out", CFG)
    report = _check_accounting(vdir)
    rejects = [json.loads(x) for x in (vdir / "rejects.jsonl").read_text().splitlines()]
    got = {r["id"]: r["reason"] for r in rejects if r["reason"] != "duplicate_id"}
    for sid, reason in expected.items():
        if reason != "kept" and sid not in ("badjson", "badutf8", "good0#dup"):
            assert got.get(sid) == reason, (sid, got.get(sid))
    reasons = Counter(r["reason"] for r in rejects)
    want = Counter(r for r in expected.values() if r != "kept")
    assert reasons == want
    kept = _samples(vdir)
    assert set(kept) == {sid for sid, r in expected.items() if r == "kept"}
    assert kept["good2"]["captions"] == ["a test scene number good2", "another caption for this scene"]
    assert (kept["conv-exif"]["width"], kept["conv-exif"]["height"]) == (80, 120)
    assert report["dedup"] == {"exact": 1, "merged": 1, "near": 1, "distance": CFG.dedup_distance}
    assert validate_version(vdir)["ok"]


def _coco(src: Path, rows: list[dict], dst: Path) -> Path:
    (dst / "annotations").mkdir(parents=True)
    (dst / "val2017").mkdir()
    images, anns = [], []
    for i, r in enumerate(rows):
        shutil.copy(src / r["image"], dst / "val2017" / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "license": 1, "width": 112, "height": 112})
        anns += [{"id": 100 * i + j, "image_id": i, "caption": c} for j, c in enumerate(r["captions"])]
    anns.append({"id": 99999, "image_id": 777, "caption": "an orphan caption"})
    (dst / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return dst


def _vqa(src: Path, rows: list[dict], dst: Path) -> Path:
    entries = [{"image": str(src / r["image"]), **qa} for r in rows for qa in r["qa"]]
    dst.mkdir()
    (dst / "vqa.json").write_text(json.dumps(entries))
    return dst / "vqa.json"


def _tabular(src: Path, rows: list[dict], dst: Path, fmt: str) -> Path:
    """One caption per row, custom column names: rows of an image are grouped into one sample."""
    dst.mkdir()
    table = [{"picture": str(src / r["image"]), "text": c} for r in rows for c in r["captions"]]
    if fmt == "csv":
        with open(dst / "m.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["picture", "text"])
            w.writeheader()
            w.writerows(table)
        return dst / "m.csv"
    pq.write_table(pa.Table.from_pylist(table), dst / "m.parquet")
    return dst / "m.parquet"


def _folder(src: Path, rows: list[dict], dst: Path) -> Path:
    (dst / "sub").mkdir(parents=True)
    for i, r in enumerate(rows):
        target = dst / ("sub" if i % 2 else ".") / f"img{i}.jpg"
        shutil.copy(src / r["image"], target)
        if i % 3 == 0:
            target.with_suffix(".json").write_text(json.dumps({"captions": r["captions"], "qa": r["qa"]}))
        else:
            target.with_suffix(".txt").write_text("\n".join(r["captions"]))
    shutil.copy(src / rows[0]["image"], dst / "lonely.jpg")  # no sidecar: a reject
    return dst


@pytest.mark.parametrize("fmt", ["coco", "vqa", "csv", "parquet", "folder"])
def test_each_source_format_ingests(ray_local, raw12, tmp_path, fmt):
    src, rows = raw12
    make = {"coco": _coco, "vqa": _vqa, "folder": _folder}.get(fmt)
    source = make(src, rows, tmp_path / "src") if make else _tabular(src, rows, tmp_path / "src", fmt)
    assert detect_format(str(source)) == fmt
    cfg = CFG.model_copy(update={"columns": {"image": "picture", "caption": "text"}})
    vdir = ingest(source, tmp_path / "out", cfg)
    report = _check_accounting(vdir)
    kept = _samples(vdir)
    assert report["kept"] == len(kept) == 12
    if fmt == "vqa":
        assert sum(len(d["qa"]) for d in kept.values()) == sum(len(r["qa"]) for r in rows)
    else:
        assert sum(len(d["captions"]) for d in kept.values()) == 12 * 5
    extra = {"coco": {"unknown_image_id": 1}, "folder": {"no_captions": 1}}.get(fmt, {})
    assert report["rejected"] == extra


def test_http_images_and_webdataset_resharding(ray_local, tiny_dataset, tmp_path):
    image = encode(scene(30))
    with ImageServer(image) as srv:
        lines = [{"id": f"h-{p.strip('/')}", "image": srv.url(p), "captions": ["a picture from the web"]}
                 for p in ("/ok.jpg", "/flaky.jpg", "/html", "/missing.jpg", "/error.jpg")]
        (tmp_path / "web").mkdir()
        (tmp_path / "web" / "s.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
        vdir = ingest(tmp_path / "web", tmp_path / "out", CFG.model_copy(update={"http_retries": 1, "allow_private_urls": True}))
    report = _check_accounting(vdir)
    assert report["rejected"] == {"bad_content_type": 1, "http_error": 2}
    # /ok and /flaky (fetched on retry) serve the same image with the same caption: one is a copy
    assert report["kept"] == 1 and report["dedup"]["exact"] == 1
    # an existing version is itself a WebDataset source: re-cleaned and re-sharded
    resharded = ingest(tiny_dataset, tmp_path / "re", CFG.model_copy(update={"shard_samples": 50}))
    assert detect_format(str(tiny_dataset)) == "webdataset"
    before, after = _samples(tiny_dataset), _samples(resharded)
    assert set(before) == set(after)
    assert all(after[k]["captions"] == before[k]["captions"] for k in before)


def test_readback_rerun_and_crash_recovery(ray_local, tiny_source, tiny_dataset, tmp_path):
    manifest = read_manifest(tiny_dataset)
    report = read_report(tiny_dataset)
    # plain webdataset and Ray Data read exactly the kept samples
    keys = set(_samples(tiny_dataset))
    paths = [p for s in SPLITS for p in shard_paths(tiny_dataset, s)]
    ray_keys = {r["__key__"] for r in ray_local.data.read_webdataset(paths).select_columns(["__key__"]).take_all()}
    assert keys == ray_keys and len(keys) == report["kept"]
    assert validate_version(tiny_dataset)["ok"]
    # re-running on the same inputs is a no-op: same directory, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in Path(tiny_dataset).rglob("*")}
    assert ingest(tiny_source, Path(tiny_dataset).parent, CFG) == tiny_dataset
    assert stamps == {p: p.stat().st_mtime_ns for p in Path(tiny_dataset).rglob("*")}
    # a killed run: shards half there, a partial file, no manifest -> rerun completes identically
    work = tmp_path / "root"
    shutil.copytree(Path(tiny_dataset).parent, work)
    vdir = work / Path(tiny_dataset).name
    (vdir / "manifest.json").unlink()
    (vdir / "train" / "shard-000001.tar").unlink()
    (vdir / "train" / "shard-000001.tar.partial").write_bytes(b"half a shard")
    assert validate_or_none(vdir) is None  # not a complete version
    assert ingest(tiny_source, work, CFG) == vdir
    again = read_manifest(vdir)
    assert again["splits"] == manifest["splits"]  # deterministic tars: same sha256s
    assert not list(vdir.rglob("*.partial"))


def test_an_unknown_listing_of_known_content_rewrites_nothing(ray_local, tiny_source, tiny_dataset, tmp_path):
    """Without `_index/` (or with touched files) the inputs are cleaned first, with the workers
    hashing the images; the content fingerprint then names the existing version, left untouched."""
    root = tmp_path / "root"
    shutil.copytree(Path(tiny_dataset).parent, root, ignore=shutil.ignore_patterns("_index"))
    vdir = root / Path(tiny_dataset).name
    stamps = {p: p.stat().st_mtime_ns for p in vdir.rglob("*")}
    assert ingest(tiny_source, root, CFG) == vdir
    assert stamps == {p: p.stat().st_mtime_ns for p in vdir.rglob("*")}
    assert sorted(p.name for p in root.iterdir()) == sorted([vdir.name, "_index"])  # no staging left
    (hint,) = (root / "_index").iterdir()
    assert json.loads(hint.read_text())["version"] == vdir.name  # the next re-run starts nothing


def test_a_failed_run_leaves_no_staging_and_no_version(ray_local, raw12, tmp_path, monkeypatch):
    """Cleaned samples are staged outside the version; a run that fails after cleaning removes
    them, leaves no version that looks complete, and the next run completes it."""
    import pipelines.ingest.driver as ingest_driver

    src, _ = raw12
    def broken(plans, vdir):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(ingest_driver, "_write_shards", broken)
    with pytest.raises(OSError, match="disk full"):
        ingest(src, tmp_path / "out", CFG)
    assert not (tmp_path / "out" / "_staging").exists()
    assert not list((tmp_path / "out").glob("*/manifest.json"))
    monkeypatch.undo()
    vdir = ingest(src, tmp_path / "out", CFG)
    assert _check_accounting(vdir)["kept"] == 12
    assert not (tmp_path / "out" / "_staging").exists()


def validate_or_none(vdir):
    try:
        return validate_version(vdir)
    except FileNotFoundError:
        return None


def test_new_inputs_make_a_new_version(ray_local, tiny_source, tiny_dataset, tmp_path):
    src = tmp_path / "more"
    shutil.copytree(tiny_source, src)
    with open(src / "samples.jsonl", "a") as f:
        f.write(json.dumps({"id": "extra", "image": "images/shapes-s0-000000.jpg", "captions": ["one more"]}) + "\n")
    vdir = ingest(src, tmp_path / "out", CFG)
    assert vdir.name != Path(tiny_dataset).name
    old, new = _samples(tiny_dataset), _samples(vdir)
    assert all(new[k]["split"] == old[k]["split"] for k in old if k in new)  # split is stable


def test_coco_mini_keeps_every_caption(ray_local, coco_mini, tmp_path):
    vdir = ingest(coco_mini, tmp_path / "out", CFG)
    report = _check_accounting(vdir)
    kept = _samples(vdir)
    assert report["kept"] == len(kept) == 159
    assert sum(len(d["captions"]) for d in kept.values()) == 795


def test_cli_ingest_prints_the_version_last_and_inspect_validate(ray_local, tiny_source, tiny_dataset, capsys):
    from mmfusion.cli import main

    out_root = str(Path(tiny_dataset).parent)
    assert main(["data", "ingest", "--source", str(tiny_source), "--out", out_root, "--config", "debug"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tiny_dataset)  # same inputs: same version
    assert main(["data", "inspect", str(tiny_dataset)]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["data", "validate", str(tiny_dataset)]) == 0
    assert capsys.readouterr().out.startswith("OK")


def test_an_ingest_of_unchanged_inputs_never_reaches_ray(tiny_source, tiny_dataset, monkeypatch):
    """The version exists: it is returned before Ray is started or connected to (which a CLI
    run would otherwise pay for, seconds on a small machine, for nothing)."""
    from pipelines.ingest import driver

    monkeypatch.setattr(driver, "_ensure_ray", lambda connect: pytest.fail("an unchanged ingest reached Ray"))
    connect = lambda: pytest.fail("an unchanged ingest connected to Ray")  # noqa: E731
    assert ingest(tiny_source, Path(tiny_dataset).parent, CFG, connect=connect) == tiny_dataset


def test_fsspec_uri_source(ray_local, raw12, tmp_path):
    """Sources are read through fsspec: a `file://` URI works like the plain path (as s3:// would)."""
    src, _ = raw12
    vdir = ingest(f"file://{src}", tmp_path / "out", CFG)
    assert _check_accounting(vdir)["kept"] == 12
