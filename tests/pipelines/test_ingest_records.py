"""One odd record costs one reject, never the ingest, and no record vanishes uncounted.

Each case is a real source file on disk, listed by the real readers (`collect_refs`) and taken
through the real cleaning step (`stage.process_batch`, the function each Ray task runs),
in-process: no Ray is needed to see what happens to one record.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ingest_corpus import encode, scene, stage_rows

from pipelines.config import ConfigError, load_config
from pipelines.ingest import stage
from pipelines.ingest.dedup import deduplicate
from pipelines.ingest.shards import plan_shards, write_shard
from pipelines.ingest.textclean import clean_qa, normalize

CFG = load_config("debug").data
CAPTION = "a scene with shapes"


def process(source, fmt: str, tmp_path: Path, cfg=CFG) -> list[dict]:
    return stage_rows(source, fmt, tmp_path, cfg)


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


def jsonl(path: Path, lines: list[bytes | dict]) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """`img/0.jpg` .. `img/5.jpg`: six different real scenes."""
    (tmp_path / "img").mkdir()
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(encode(scene(30 + i)))
    return tmp_path


# ----------------------------------------------------------------------------- crashes


def test_numbers_and_booleans_are_answers_and_null_is_no_answer(images, tmp_path):
    src = jsonl(images / "qa.jsonl", [
        {"id": "num", "image": "img/0.jpg", "qa": [{"question": "how many?", "answers": 2}]},
        {"id": "nums", "image": "img/1.jpg", "qa": [{"question": "how many?", "answers": [2, 3.0, 2.5]}]},
        {"id": "bool", "image": "img/2.jpg", "qa": [{"question": "is it red?", "answer": True}]},
        {"id": "null", "image": "img/3.jpg", "qa": [{"question": "is it red?", "answers": None}]},
        {"id": "nulls", "image": "img/4.jpg", "qa": [{"question": "is it red?", "answers": [None, False]}]},
    ])
    rows = by_id(process(src, "jsonl", tmp_path))
    assert {k: r["reason"] for k, r in rows.items()} == {"num": "", "nums": "", "bool": "", "null": "no_captions",
                                                         "nulls": ""}
    assert json.loads(rows["nums"]["qa"]) == [{"question": "how many?", "answers": ["2", "3", "2.5"]}]
    assert json.loads(rows["bool"]["qa"])[0]["answers"] == ["yes"]
    assert json.loads(rows["nulls"]["qa"])[0]["answers"] == ["no"]
    assert clean_qa([{"question": "q", "answers": float("nan")}], 100) == ([], ["bad_qa"])


def test_lone_surrogates_and_nul_in_ids_and_paths_are_rejects(images, tmp_path):
    src = jsonl(images / "bad.jsonl", [
        b'{"id": "sur\\ud800id", "image": "img/0.jpg", "captions": ["' + CAPTION.encode() + b'"]}',
        b'{"id": "surpath", "image": "img/\\udc00.jpg", "captions": ["' + CAPTION.encode() + b'"]}',
        b'{"id": "nulpath", "image": "img/0.jpg\\u0000x", "captions": ["' + CAPTION.encode() + b'"]}',
        b'{"id": "surmeta", "image": "img/1.jpg", "captions": ["' + CAPTION.encode() + b'"], "meta": {"a": "\\ud83d"}}',
        {"id": "fine", "image": "img/2.jpg", "captions": [CAPTION]},
    ])
    rows = process(src, "jsonl", tmp_path)
    assert [(r["id"], r["reason"]) for r in rows] == [
        ("sur\\ud800id", "invalid_encoding"), ("surpath", "invalid_path"), ("nulpath", "invalid_path"),
        ("surmeta", "invalid_encoding"), ("fine", "")]
    assert "NUL" in rows[2]["detail"] and "lone surrogate" in rows[1]["detail"]


def test_a_binary_parquet_caption_column_is_text(images, tmp_path):
    table = pa.table({"id": ["a", "b"], "image": ["img/0.jpg", "img/1.jpg"],
                      "caption": pa.array([CAPTION.encode(), b"caf\xe9 is not utf-8"], pa.binary())})
    pq.write_table(table, images / "t.parquet")
    rows = by_id(process(images / "t.parquet", "parquet", tmp_path))
    assert json.loads(rows["a"]["captions"]) == [CAPTION]
    assert rows[f"{images}/t.parquet:1"]["reason"] == "invalid_encoding"  # bad bytes: that row only


def test_a_csv_field_over_128_kib_is_one_reject(images, tmp_path):
    (images / "big.csv").write_text(f"id,image,caption\na,img/0.jpg,{'y' * 140_000}\nb,img/1.jpg,{CAPTION}\n")
    rows = process(images / "big.csv", "csv", tmp_path)
    assert [(r["reason"], r["id"]) for r in rows] == [("malformed_csv", f"{images}/big.csv:2"), ("", "b")]
    assert "field larger than field limit" in rows[0]["detail"]


def test_a_csv_header_with_a_byte_order_mark(images, tmp_path):
    (images / "bom.csv").write_bytes(b"\xef\xbb\xbfimage,caption\nimg/0.jpg," + CAPTION.encode() + b"\n")
    (row,) = process(images / "bom.csv", "csv", tmp_path)
    assert row["reason"] == "" and json.loads(row["captions"]) == [CAPTION]


def test_coco_entries_that_are_not_objects_are_rejects(images, tmp_path):
    (images / "c.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "img/0.jpg"}, "img/1.jpg", {"id": 2, "file_name": ["img/2.jpg"]}],
        "annotations": [{"image_id": 0, "caption": CAPTION}, 5, None, {"image_id": [0], "caption": "x"}]}))
    rows = process(images / "c.json", "coco", tmp_path)
    reasons = sorted(r["reason"] for r in rows)
    assert reasons == ["", "bad_field_type", "malformed_record", "malformed_record", "malformed_record",
                       "malformed_record"]
    assert [r["image"] for r in rows if not r["reason"]] == [str(images / "img" / "0.jpg")]


def test_a_vqa_image_that_is_a_list_is_a_reject(images, tmp_path):
    (images / "v.json").write_text(json.dumps([
        {"image": ["img/0.jpg"], "question": "what is it?", "answers": ["a circle"]},
        {"image": "img/1.jpg", "question": "what is it?", "answers": ["a square"]},
        7,
    ]))
    rows = process(images / "v.json", "vqa", tmp_path)
    assert [r["reason"] for r in rows] == ["bad_field_type", "missing_field", ""]
    assert "'image' must be a path or URL string, not list" in rows[0]["detail"]


def test_a_vqa_questions_file_with_no_split_name_is_one_reject(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"questions": [{"question": "what?", "image_id": 1}]}))
    (row,) = process(tmp_path / "v.json", "vqa", tmp_path)
    assert row["reason"] == "unknown_split" and "v2_OpenEnded_mscoco_<split>_questions.json" in row["detail"]


@pytest.mark.parametrize("url", ["http://exa mple.com/x.jpg", "http://[::1/x.jpg", "foo://host/x.jpg",
                                 "HTTP://127.0.0.1:9/x.jpg"])
def test_an_unreadable_url_is_a_reject_and_the_batch_goes_on(images, tmp_path, url):
    src = jsonl(images / "u.jsonl", [{"id": "url", "image": url, "captions": [CAPTION]},
                                     {"id": "fine", "image": "img/0.jpg", "captions": [CAPTION]}])
    rows = by_id(process(src, "jsonl", tmp_path))
    assert rows["url"]["reason"] and rows["fine"]["reason"] == ""


def test_an_unexpected_error_is_a_reject_naming_it_without_the_data_and_logs_its_traceback(
        images, tmp_path, monkeypatch, caplog):
    """The catch-all: an error no step expects (here injected into image cleaning for one image,
    carrying that file's bytes in its message) rejects that record only."""
    secret = (images / "img" / "1.jpg").read_bytes()[:12]
    real = stage.clean_image

    def clean(data: bytes, spec):
        if data.startswith(secret) and data == (images / "img" / "1.jpg").read_bytes():
            raise ValueError(f"cannot handle {data[:12]!r} in {'x' * 60!r}")
        return real(data, spec)

    monkeypatch.setattr(stage, "clean_image", clean)
    src = jsonl(images / "e.jsonl", [{"id": f"r{i}", "image": f"img/{i}.jpg", "captions": [CAPTION]} for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="pipelines.ingest.stage"):
        rows = process(src, "jsonl", tmp_path)
    assert [r["reason"] for r in rows] == ["", "processing_error", ""]
    assert rows[1]["detail"] == "clean_image: ValueError: cannot handle <bytes> in '<text>'"
    assert repr(secret)[2:-1] not in rows[1]["detail"]
    (record,) = [r for r in caplog.records if "processing_error" in r.getMessage()]
    assert "r1" in record.getMessage() and record.exc_info and record.exc_info[0] is ValueError


# ----------------------------------------------------------------------------- silent losses


def _tar(samples: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(i: int) -> list[tuple[str, bytes]]:
    return [(f"s{i}.jpg", encode(scene(40 + i))), (f"s{i}.json", json.dumps({"captions": [f"{CAPTION} {i}"]}).encode())]


def test_a_tar_cut_in_its_fifth_sample_keeps_four_and_rejects_the_rest(tmp_path):
    blob = _tar([m for i in range(6) for m in _members(i)])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        fifth = tar.getmember("s4.jpg")
    (tmp_path / "cut.tar").write_bytes(blob[: fifth.offset_data + 100])  # inside s4's image
    rows = process(tmp_path / "cut.tar", "webdataset", tmp_path)
    assert [r["id"] for r in rows if not r["reason"]] == ["s0", "s1", "s2", "s3"]
    rejects = [(r["id"], r["reason"]) for r in rows if r["reason"]]
    assert rejects == [("s4", "truncated_tar"), (f"{tmp_path}/cut.tar#rest", "truncated_tar")]
    assert "lost" in rows[-1]["detail"]


def test_a_corrupt_header_keeps_what_came_before(tmp_path):
    blob = bytearray(_tar([m for i in range(4) for m in _members(i)]))
    with tarfile.open(fileobj=io.BytesIO(bytes(blob))) as tar:
        blob[tar.getmember("s2.jpg").offset + 10] ^= 0xFF  # the header's checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(blob))
    rows = process(tmp_path / "bad.tar", "webdataset", tmp_path)
    assert [(r["id"], r["reason"]) for r in rows] == [
        ("s0", ""), ("s1", "corrupt_tar"), (f"{tmp_path}/bad.tar#rest", "corrupt_tar")]


def test_a_repeated_member_name_is_a_reject_not_an_overwrite(tmp_path):
    first, again = _members(0), _members(1)
    (tmp_path / "dup.tar").write_bytes(_tar(first + [("s0.jpg", again[0][1]), ("s0.json", again[1][1])]))
    rows = process(tmp_path / "dup.tar", "webdataset", tmp_path)
    assert [(r["id"], r["reason"]) for r in rows] == [("s0", ""), (f"{tmp_path}/dup.tar#s0#2", "duplicate_member")]
    assert json.loads(rows[0]["captions"]) == [f"{CAPTION} 0"]  # the first member, not the repeat


def test_a_bare_manifest_name_resolves_images_beside_it(images, tmp_path, monkeypatch):
    jsonl(images / "raw.jsonl", [{"id": "a", "image": "img/0.jpg", "captions": [CAPTION]}])
    (images / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "img/1.jpg"}],
                                               "annotations": [{"image_id": 1, "caption": CAPTION}]}))
    monkeypatch.chdir(images)
    for name, fmt in (("raw.jsonl", "jsonl"), ("c.json", "coco")):
        (row,) = process(name, fmt, tmp_path)
        assert row["reason"] == "" and row["image"].startswith(str(images / "img")), (name, row)


def test_a_jsonl_that_starts_with_a_byte_order_mark_keeps_its_first_line(images, tmp_path):
    src = images / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "first", "image": "img/0.jpg", "captions": [CAPTION]}).encode()
                    + b"\n" + json.dumps({"id": "second", "image": "img/1.jpg", "captions": [CAPTION]}).encode())
    assert [(r["id"], r["reason"]) for r in process(src, "jsonl", tmp_path)] == [("first", ""), ("second", "")]


def test_unknown_split_names_are_a_config_error_naming_them():
    with pytest.raises(ConfigError, match=r"unknown split 'validation'; the splits are train, val, test"):
        load_config("debug", ["data.split_fractions={train: 0.9, validation: 0.1}"])
    with pytest.raises(ConfigError, match="no split has a fraction above 0"):
        load_config("debug", ["data.split_fractions={train: 0, val: 0}"])
    assert load_config("debug", ["data.split_fractions={train: 1}"]).data.split_fractions == {"train": 1.0}


def test_a_repeated_csv_id_naming_another_image_is_a_duplicate_id_reject(images, tmp_path):
    (images / "d.csv").write_text(f"id,image,caption\na,img/0.jpg,{CAPTION}\na,img/0.jpg,second caption here\n"
                                  f"a,img/1.jpg,{CAPTION} elsewhere\n")
    rows = process(images / "d.csv", "csv", tmp_path)
    assert [(r["id"], r["reason"]) for r in rows] == [(f"{images}/d.csv:4", "duplicate_id"), ("a", "")]
    assert "names image 'img/1.jpg', but row 2 gave it 'img/0.jpg'" in rows[0]["detail"]
    assert json.loads(rows[1]["captions"]) == [CAPTION, "second caption here"]  # same image: one sample


def test_merging_exact_duplicates_keeps_the_duplicate_s_qa_pairs(images, tmp_path):
    (images / "img" / "copy.jpg").write_bytes((images / "img" / "0.jpg").read_bytes())
    src = jsonl(images / "q.jsonl", [
        {"id": "a", "image": "img/0.jpg", "captions": [CAPTION], "qa": [{"question": "what colour?", "answers": ["red"]}]},
        {"id": "b", "image": "img/copy.jpg", "captions": [CAPTION], "qa": [{"question": "how many?", "answers": ["2"]}]},
    ])
    rows = process(src, "jsonl", tmp_path)
    result = deduplicate(rows, CFG.dedup_distance)
    assert [(d["key"], d["reason"]) for d in result.dropped] == [("b", "duplicate_merged")]
    (plan,) = plan_shards(result.kept, result.extra_captions, 100, 10**9)
    entry = write_shard(plan, str(tmp_path / "version"))
    with tarfile.open(tmp_path / "version" / entry["path"]) as tar:
        doc = json.loads(tar.extractfile("a.json").read())
    assert doc["qa"] == [{"question": "what colour?", "answers": ["red"]}, {"question": "how many?", "answers": ["2"]}]


@pytest.mark.parametrize(("raw", "clean"), [
    ("x < 5 and y > 3", "x < 5 and y > 3"),
    ("a <b>bold</b> word", "a bold word"),
    ("&lt;script&gt;alert(1)&lt;/script&gt; hi", "alert(1) hi"),
    ("<3 you &amp; me", "<3 you & me"),
    ("a &amp;lt;b&amp;gt; c", "a &lt;b&gt; c"),  # escaped twice: stays escaped text, never a tag
    ("<scr<b>ipt>alert(1)</scr<i>ipt>", "alert(1)"),  # a tag that stripping another one makes
    ("<s\u200bcript>x", "x"),  # a tag once the invisible character is gone
])
def test_html_is_stripped_after_unescaping_and_comparisons_are_text(raw, clean):
    assert normalize(raw) == clean


def test_an_ingest_of_odd_records_counts_every_one(ray_local, images, tmp_path):
    """The whole job on Ray: odd records are rejects in report.json and rejects.jsonl, the rest
    are in the shards (a duplicate's QA pair merged in), and seen = kept + rejected + duplicates."""
    import webdataset as wds

    from pipelines.core.dataset import SPLITS, read_report, shard_paths
    from pipelines.ingest import ingest

    (images / "img" / "copy.jpg").write_bytes((images / "img" / "0.jpg").read_bytes())
    qa = [{"question": "how many?", "answers": 2}]
    jsonl(images / "raw.jsonl", [
        {"id": "a", "image": "img/0.jpg", "captions": [CAPTION]},
        {"id": "a-copy", "image": "img/copy.jpg", "captions": [CAPTION], "qa": qa},
        {"id": "num", "image": "img/1.jpg", "qa": [{"question": "is it red?", "answers": True}]},
        b'{"id": "sur\\ud800", "image": "img/2.jpg", "captions": ["' + CAPTION.encode() + b'"]}',
        {"id": "nul", "image": "img/3.jpg\u0000", "captions": [CAPTION]},
        {"id": "url", "image": "http://[::1/x.jpg", "captions": [CAPTION]},
        {"id": "html", "image": "img/4.jpg", "captions": ["&lt;script&gt;x&lt;/script&gt; and x < 5"]},
    ])
    vdir = ingest(images / "raw.jsonl", tmp_path / "out", CFG)
    report = read_report(vdir)
    assert (report["seen"], report["kept"], report["duplicates"]) == (7, 3, 1)
    assert report["rejected"].keys() >= {"invalid_encoding", "invalid_path"} and sum(report["rejected"].values()) == 3
    rejects = [json.loads(x) for x in (vdir / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejects) == sorted(["a-copy", "sur\\ud800", "nul", "url"])
    docs = {}
    for paths in filter(None, (shard_paths(vdir, split) for split in SPLITS)):
        for s in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
            docs[s["__key__"]] = json.loads(s["json"])
    assert docs["a"]["qa"] == [{"question": "how many?", "answers": ["2"]}]
    assert docs["num"]["qa"] == [{"question": "is it red?", "answers": ["yes"]}]
    assert docs["html"]["captions"] == ["x and x < 5"]


def test_format_detection_reads_past_entries_that_are_not_objects(tmp_path):
    from pipelines.ingest.sources import detect_format

    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": [5, {"image_id": 1, "caption": "x"}]}))
    assert detect_format(str(tmp_path / "c.json")) == "coco"
    (tmp_path / "o.json").write_text(json.dumps({"annotations": 5}))
    with pytest.raises(ValueError, match="must be COCO captions or VQA-style; pass --format"):
        detect_format(str(tmp_path / "o.json"))
