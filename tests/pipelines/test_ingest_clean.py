"""Cleaning, dedup, split, shard planning and HTTP fetching, without Ray (fast, exact)."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
from ingest_corpus import ImageServer, awkward_images, encode, png_with_header_size, scene
from PIL import Image

from pipelines.config import DataConfig, load_config
from pipelines.core.storage import sha256_file
from pipelines.ingest import stage
from pipelines.ingest.dedup import deduplicate
from pipelines.ingest.fetch import FetchError, FetchLimits, fetch
from pipelines.ingest.fingerprint import fingerprint, list_source, local_path, quick_key
from pipelines.ingest.imageclean import ImageReject, ImageSpec, clean_image, resize, to_rgb
from pipelines.ingest.phash import hamming, phash, phash_many, thumbnail
from pipelines.ingest.shards import archive_bytes, parse_members, plan_shards
from pipelines.ingest.stage import split_of
from pipelines.ingest.textclean import TextReject, clean_caption, normalize

SPEC = ImageSpec.of(DataConfig(image_size=64, resize_mode="shorter", jpeg_quality=90, min_side=16, max_aspect=6.0,
                                max_pixels=4_000_000))


def _out(c) -> Image.Image:
    return Image.open(io.BytesIO(c.jpeg))


@pytest.mark.parametrize("name", sorted(awkward_images()))
def test_awkward_images_become_rgb_jpeg(name):
    c = clean_image(awkward_images()[name], SPEC)
    out = _out(c)
    assert out.format == "JPEG" and out.mode == "RGB" and min(out.size) == 64


def test_alpha_is_composited_on_white_and_exif_orientation_applied():
    alpha = _out(clean_image(awkward_images()["alpha"], SPEC))
    assert all(v > 245 for v in alpha.getpixel((32, 2)))  # transparent rows -> white
    rotated = clean_image(awkward_images()["exif"], SPEC)
    assert (rotated.width, rotated.height) == (80, 120)  # 120x80 stored, orientation 6
    assert _out(rotated).size == (64, 96)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_file"),
        (b"GIF89a but then nothing useful", "not_an_image"),
        (encode(scene(1), "PPM"), "unsupported_format"),
        (png_with_header_size(200_000, 200_000), "decompression_bomb"),
        (png_with_header_size(3000, 2000), "decompression_bomb"),  # above the 4M cap, header only
        (encode(scene(1))[:900], "truncated_image"),
        (encode(scene(1).resize((12, 40)), "PNG"), "too_small"),
        (encode(scene(1).resize((700, 100)), "PNG"), "bad_aspect_ratio"),
    ],
)
def test_bad_images_are_rejected_with_reason(data, reason):
    with pytest.raises(ImageReject) as e:
        clean_image(data, SPEC)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    "mode, size, expected",
    [("shorter", (200, 100), (128, 64)), ("longer", (200, 100), (64, 32)),
     ("center_crop", (200, 100), (64, 64)), ("none", (200, 100), (200, 100))],
)
def test_resize_modes(mode, size, expected):
    spec = dataclasses.replace(SPEC, resize_mode=mode)
    assert _out(clean_image(encode(scene(3).resize(size)), spec)).size == expected


def test_text_normalisation_and_rejects():
    assert normalize("  Cafe\u0301 <i>on</i>\tthe\x00 left &amp; right\n") == "Café on the left & right"
    assert clean_caption(b"a red circle", 3, 50) == "a red circle"
    for raw, reason in [(b"caf\xe9 au lait", "invalid_encoding"), ("bad \ud800", "invalid_encoding"),
                        ("<p> </p>", "caption_empty"), ("ab", "caption_too_short"), ("x" * 60, "caption_too_long")]:
        with pytest.raises(TextReject) as e:
            clean_caption(raw, 3, 50)
        assert e.value.reason == reason


def test_phash_is_close_for_copies_and_far_for_other_scenes():
    a = phash(scene(5))
    assert hamming(a, phash(Image.open(io.BytesIO(encode(scene(5).resize((90, 90)), quality=60))))) <= 4
    assert min(hamming(a, phash(scene(i))) for i in range(6, 40)) > 8


def test_phash_of_many_images_is_each_image_s_own_phash():
    imgs = [scene(i).resize((40 + 7 * i, 90 - i)) for i in range(45)]  # sizes differ: thumbnails do not
    alone = [phash(img) for img in imgs]
    assert len(set(alone)) == len(alone)
    thumbs = [thumbnail(img) for img in imgs]
    assert phash_many(thumbs) == alone  # one batch
    assert [h for i in range(0, 45, 8) for h in phash_many(thumbs[i : i + 8])] == alone  # other groupings
    assert phash_many([]) == []
    # A cleaned image's hash is the hash of the resized image it was encoded from.
    spec = dataclasses.replace(SPEC, jpeg_quality=100)
    cleaned = clean_image(encode(scene(3)), spec)
    lossless = clean_image(encode(scene(3), "PNG"), spec)
    assert lossless.phash == phash(resize(to_rgb(scene(3)), spec))
    assert hamming(cleaned.phash, phash(_out(cleaned))) <= 2  # the JPEG of it, decoded again


def _ingest_source(root, n: int) -> dict[int, str]:
    """`n` raw JSONL records over more than two cleaning groups, some of them bad; returns
    {input position: expected reject reason} for the bad ones."""
    (root / "img").mkdir(parents=True)
    bad, lines = {}, []
    for i in range(n):
        rec = {"id": f"s{i:03d}", "image": f"img/{i:03d}.jpg", "captions": [f"scene number {i} of the test"]}
        if i % 7 == 3:
            (root / rec["image"]).write_bytes(b"not an image at all")
            bad[i] = "not_an_image"
        elif i % 11 == 5:
            bad[i] = "missing_image"  # never written
        elif i % 13 == 6:
            rec["captions"] = ["   "]
            bad[i] = "caption_empty"
        if i % 7 != 3 and i % 11 != 5:
            (root / rec["image"]).write_bytes(encode(scene(i).resize((96 + i % 5, 80))))
        lines.append(json.dumps(rec))
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return bad


def test_a_cleaning_batch_gives_each_ref_the_row_and_tar_members_it_gets_alone(tmp_path, monkeypatch):
    """process_batch takes Refs through each step a group at a time, reading a group's files
    ahead up to a byte cap: rows, hashes and staged bytes must be what one Ref at a time gives,
    in input order, with rejects across groups."""
    from pipelines.ingest.driver import collect_refs

    n = 2 * stage.GROUP + 11
    bad = _ingest_source(tmp_path / "src", n)
    cfg = load_config("local", ["data.image_size=64", "data.min_side=16"]).data
    refs = collect_refs(str(tmp_path / "src"), "jsonl", cfg)
    lines = [json.dumps(r) for r in refs]
    def run(name: str) -> list[dict]:
        return stage.process_batch(lines, cfg.model_dump(mode="json"), str(tmp_path / name), True)

    grouped = run("grouped")
    monkeypatch.setattr(stage, "READ_AHEAD_BYTES", 1)  # one file read ahead; the others when decoded
    capped = run("capped")
    monkeypatch.setattr(stage, "GROUP", 1)
    single = run("single")

    assert [r["order"] for r in grouped] == list(range(n))
    assert {r["order"]: r["reason"] for r in grouped if r["reason"]} == bad
    assert grouped[3]["detail"] == "no image format recognises these 19 bytes"  # never the bytes themselves
    spec = ImageSpec.of(cfg)
    for g, c, s in zip(grouped, capped, single, strict=True):
        assert {**g, "stage_file": ""} == {**c, "stage_file": ""} == {**s, "stage_file": ""}
        if g["reason"]:
            continue
        data = (tmp_path / "src" / f"img/{g['order']:03d}.jpg").read_bytes()
        cleaned = clean_image(data, spec)
        blob = open(g["stage_file"], "rb").read()[g["stage_offset"] : g["stage_offset"] + g["nbytes"]]
        member = parse_members(blob, g["key"])
        assert member["jpg"] == cleaned.jpeg and json.loads(member["json"])["captions"] == json.loads(g["captions"])
        assert g["phash"] == f"{cleaned.phash:016x}" and g["pixel_sha"] == cleaned.pixel_sha
        assert g["file_sha"] and g["file_sha"] == sha256_file(str(tmp_path / "src" / f"img/{g['order']:03d}.jpg"))
    for split in {r["split"] for r in grouped if not r["reason"]}:
        name = f"stage-000000000-{split}.members"
        staged = (tmp_path / "grouped" / name).read_bytes()
        assert staged == (tmp_path / "capped" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()


def _row(key, order, pix, ph, caps):
    return {"key": key, "order": order, "pixel_sha": pix, "phash": f"{ph:016x}", "captions": json.dumps(caps)}


def test_dedup_is_deterministic_and_accounts_for_every_row():
    rows = [
        _row("b", 0, "p1", 0xFF00, ["x"]), _row("a", 1, "p1", 0xFF00, ["x"]),  # exact: keep a
        _row("c", 2, "p2", 0x1234, ["y"]), _row("d", 3, "p2", 0x1234, ["z"]),  # merge d into c
        _row("e", 4, "p3", 0xF0F0_0000_0000, ["w"]), _row("f", 5, "p4", 0xF0F0_0000_0007, ["v"]),  # near
        _row("g", 6, "p5", 0x0F0F_FFFF_0000, ["u"]),
    ]
    result = deduplicate(list(reversed(rows)), distance=4)
    assert [r["key"] for r in result.kept] == ["a", "c", "e", "g"]
    assert sorted((d["key"], d["reason"], d["of"]) for d in result.dropped) == [
        ("b", "duplicate_exact", "a"), ("d", "duplicate_merged", "c"), ("f", "duplicate_near", "e")]
    assert result.extra_captions == {"c": ["z"]}
    assert len(deduplicate(rows, distance=-1).kept) == 5  # near-dup matching disabled


def test_split_is_a_stable_function_of_the_key():
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    # Pinned: these keys must keep their splits in every release, or test samples leak into training.
    pinned = {"k0": "val", "k1": "train", "k2": "train", "k7": "test", "k21": "val", "k23": "test",
              "s000001": "train", "coco-9": "train"}
    assert {k: split_of(k, fractions) for k in pinned} == pinned
    splits = [split_of(f"k{i}", fractions) for i in range(5000)]
    assert 0.77 < splits.count("train") / 5000 < 0.83 and 0.08 < splits.count("test") / 5000 < 0.12


def test_shard_plan_respects_count_and_byte_caps():
    rows = [{"key": f"k{i}", "split": "train", "nbytes": 30_000, "stage_file": "f", "stage_offset": i * 30_000}
            for i in range(25)]
    by_count = plan_shards(rows, {}, max_samples=10, max_bytes=10**9)
    assert [len(p["members"]) for p in by_count] == [10, 10, 5]
    by_bytes = plan_shards(rows, {}, max_samples=100, max_bytes=100_000)
    assert all(archive_bytes(30_000 * len(p["members"])) <= 100_000 for p in by_bytes)
    assert sum(len(p["members"]) for p in by_bytes) == 25


def test_http_fetch_handles_errors_retries_timeouts_and_content_types():
    image = encode(scene(9))
    local = FetchLimits(allow_private=True)  # the server is on 127.0.0.1
    with ImageServer(image) as srv:
        assert fetch({"kind": "url", "uri": srv.url("/ok.jpg")}, timeout=2, retries=0, limits=local) == image
        assert fetch({"kind": "url", "uri": srv.url("/flaky.jpg")}, timeout=2, retries=2, limits=local) == image
        for path, reason in [("/html", "bad_content_type"), ("/missing.jpg", "http_error"),
                             ("/error.jpg", "http_error"), ("/slow.jpg", "http_timeout")]:
            with pytest.raises(FetchError) as e:
                fetch({"kind": "url", "uri": srv.url(path)}, timeout=0.5, retries=1, limits=local)
            assert e.value.reason == reason, path
        assert srv.hits["/missing.jpg"] == 1  # client errors are not retried
        assert srv.hits["/error.jpg"] == 2  # server errors are, a bounded number of times


def test_a_shard_interrupted_mid_write_never_looks_finished(tmp_path):
    import webdataset as wds

    from pipelines.ingest.shards import serialize, write_shard

    stage = tmp_path / "stage.members"
    doc = json.dumps({"id": "a", "captions": ["x y z"]})
    stage.write_bytes(serialize({"__key__": "a", "jpg": encode(scene(1)), "txt": b"x y z", "json": doc.encode()}))
    good = {"key": "a", "file": str(stage), "offset": 0, "length": stage.stat().st_size, "extra": []}
    plan = {"split": "train", "index": 0, "path": "train/shard-000000.tar", "members": [good]}
    entry = write_shard(plan, str(tmp_path / "v"))
    assert [s["__key__"] for s in wds.WebDataset(str(tmp_path / "v" / entry["path"]), shardshuffle=False)] == ["a"]
    assert entry == write_shard(plan, str(tmp_path / "v2")) | {"path": entry["path"]}  # deterministic bytes
    broken = dict(plan, index=1, path="train/shard-000001.tar",
                  members=[good, {**good, "key": "b", "file": str(tmp_path / "gone.members")}])
    with pytest.raises(FileNotFoundError):
        write_shard(broken, str(tmp_path / "v"))
    assert not (tmp_path / "v" / "train" / "shard-000001.tar").exists()
    assert (tmp_path / "v" / "train" / "shard-000001.tar.partial").exists()


def test_fingerprint_is_the_same_whoever_hashed_the_files(tmp_path):
    """Worker digests (sha256 of the bytes a worker read) stand in for the driver's own hashing."""
    (tmp_path / "images").mkdir()
    for i in range(5):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(encode(scene(i)))
    (tmp_path / "samples.jsonl").write_text("{}\n")
    refs = [{"id": str(i), "image": {"kind": "path", "uri": f"{tmp_path}/images/{i}.jpg"}} for i in range(5)]
    listing = list_source(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p, _, _ in listing.files] == [*(f"{i}.jpg" for i in range(5)), "samples.jsonl"]
    on_driver = fingerprint(listing, refs)
    digests = {local_path(r["image"]["uri"]): sha256_file(r["image"]["uri"]) for r in refs[:3]}
    assert fingerprint(listing, refs, digests) == on_driver
    # the digests are used, not recomputed: a wrong one changes the result
    wrong = {**digests, local_path(refs[0]["image"]["uri"]): "0" * 64}
    assert fingerprint(listing, refs, wrong)["fingerprint"] != on_driver["fingerprint"]
    # the quick key follows the listing: a touched file (same bytes) changes it, the fingerprint not
    key = quick_key(listing, refs)
    os.utime(tmp_path / "images" / "2.jpg", ns=(1, 1))
    touched = list_source(str(tmp_path))
    assert quick_key(touched, refs) != key
    assert fingerprint(touched, refs) == on_driver
    (tmp_path / "images" / "2.jpg").write_bytes(encode(scene(9)))
    assert fingerprint(list_source(str(tmp_path)), refs)["fingerprint"] != on_driver["fingerprint"]
