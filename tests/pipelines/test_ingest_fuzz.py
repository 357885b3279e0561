"""Property-based fuzzing of the record readers (jsonl, csv, coco, vqa, WebDataset tars) and the
text cleaner, with random and adversarial values in every field.

The property: listing and cleaning never raise, and the accounting holds, seen == kept +
rejected + duplicates (`report.build_report` checks it), with one accounting row per Ref.
Examples are bounded and derandomised with no example database, so CI runs the same
examples every time (a few seconds per test, well under 2 minutes in all).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_corpus import encode, scene

from pipelines.config import load_config
from pipelines.ingest import stage
from pipelines.ingest.dedup import deduplicate
from pipelines.ingest.driver import collect_refs
from pipelines.ingest.report import build_report, rejects_lines
from pipelines.ingest.textclean import _TAG, TextReject, clean_captions, clean_qa, normalize

CFG = load_config("debug").data
# MMFUSION_FUZZ_EXAMPLES=2000 MMFUSION_FUZZ_RANDOM=1 explores beyond CI's fixed examples.
FUZZ = settings(max_examples=int(os.environ.get("MMFUSION_FUZZ_EXAMPLES", "100")), deadline=None,
                derandomize=os.environ.get("MMFUSION_FUZZ_RANDOM") != "1", database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
IMAGES = {f"img/{i}.jpg": encode(scene(50 + i).resize((48, 48))) for i in range(3)}

# Strings that broke, or could break, some reader: markup, entities, BOMs, NULs, lone surrogates,
# path tricks, URLs of every shape, numbers as text, long text.
ADVERSARIAL = st.sampled_from([
    "", " ", "\x00", "\ufeff", "\ud800", "\udcff", "x\ud83d", "\u200b", "\r\n", "\\", '"', "'", ",", "|",
    "<script>alert(1)</script>", "&lt;script&gt;", "x < 5 and y > 3", "<scr<b>ipt>", "&amp;lt;b&amp;gt;",
    "../../etc/passwd", "/dev/null", "img", "img/", "img/0.jpg", "img/0.jpg\x00", "img/missing.jpg",
    "http://exa mple.com/x.jpg", "http://[::1/x.jpg", "foo://x/y.jpg", "HTTP://127.0.0.1:9/x.jpg",
    "s3://", "file:///nonexistent.jpg", "1e309", "NaN", "[", "[1, 2", '["a", ["b"]]', "a" * 3000,
])
TEXT = st.one_of(ADVERSARIAL, st.text(st.characters(exclude_categories=()), max_size=30),
                 st.sampled_from(sorted(IMAGES)))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
QA = st.lists(st.one_of(JSON, st.fixed_dictionaries({"question": JSON}, optional={"answers": JSON, "answer": JSON})),
              max_size=3)


def record_fields() -> st.SearchStrategy[dict]:
    """A raw record: each known field present or not, well-formed or any JSON value."""
    return st.fixed_dictionaries({}, optional={
        "id": st.one_of(TEXT, JSON), "image": st.one_of(st.sampled_from(sorted(IMAGES)), TEXT, JSON),
        "captions": st.one_of(st.lists(TEXT, max_size=3), JSON), "caption": JSON, "qa": st.one_of(QA, JSON),
        "meta": JSON, "question": JSON, "answers": JSON, "file_name": st.one_of(TEXT, JSON),
        "image_id": JSON, "question_id": JSON,
    })


def accounted(source: Path, fmt: str) -> tuple[list[dict], list[dict]]:
    """List and clean `source` as an ingest does (in-process), check the accounting; (refs, rows)."""
    refs = collect_refs(str(source), fmt, CFG)
    with tempfile.TemporaryDirectory() as staging:
        rows = stage.process_batch([json.dumps(r) for r in refs], CFG.model_dump(mode="json"), staging) if refs else []
    assert [r["order"] for r in rows] == [r["order"] for r in refs]
    result = deduplicate([r for r in rows if not r["reason"]], CFG.dedup_distance)
    report = build_report("fuzz", rows, result, [], CFG)  # raises when seen != kept + rejected + duplicates
    assert report["seen"] == len(refs)
    assert len(rejects_lines(rows, result).splitlines()) == report["seen"] - report["kept"]
    return refs, rows


@contextlib.contextmanager
def _folder():
    """A fresh folder per example holding the images the records may name (`img/0.jpg`, ...)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        root = Path(d)
        (root / "img").mkdir()
        for name, data in IMAGES.items():
            (root / name).write_bytes(data)
        yield root


@FUZZ
@given(st.lists(st.one_of(record_fields().map(lambda r: json.dumps(r).encode()), st.binary(max_size=60)),
                max_size=8), st.booleans())
def test_jsonl_records(lines, bom):
    lines = [line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines]
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines)
    with _folder() as root:
        (root / "raw.jsonl").write_bytes(data)
        refs, _ = accounted(root / "raw.jsonl", "jsonl")
    # one Ref per non-blank line; a byte-order mark starting the file is not part of its first line
    assert len(refs) == sum(1 for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())


@FUZZ
@given(st.lists(st.lists(TEXT, min_size=5, max_size=5), max_size=8), st.booleans(), st.binary(max_size=40))
def test_csv_rows(cells, bom, junk):
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["id", "image", "caption", "question", "answers"])
    writer.writerows(cells)
    data = buf.getvalue().encode("utf-8", "surrogatepass") + junk
    with _folder() as root:
        (root / "t.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
        refs, _ = accounted(root / "t.csv", "csv")
    # every row written is in a Ref (rows of one id or image share one) or is a reject of its own
    assert sum(len(r["meta"].get("rows", [])) or 1 for r in refs) >= len(cells)


@FUZZ
@given(st.lists(st.one_of(record_fields(), JSON), max_size=6), st.lists(st.one_of(record_fields(), JSON), max_size=6))
def test_coco_entries(images, annotations):
    with _folder() as root:
        (root / "c.json").write_text(json.dumps({"images": images, "annotations": annotations}))
        accounted(root / "c.json", "coco")


@FUZZ
@given(st.one_of(st.lists(st.one_of(record_fields(), JSON), max_size=6),
                 st.fixed_dictionaries({"questions": st.lists(st.one_of(record_fields(), JSON), max_size=5)},
                                       optional={"images": JSON, "annotations": st.lists(JSON, max_size=3)})))
def test_vqa_entries(data):
    with _folder() as root:
        (root / "v.json").write_text(json.dumps(data))
        accounted(root / "v.json", "vqa")


MEMBER = st.tuples(st.sampled_from(["s0", "s1", "s2", "d/s3", "s.4", ".hidden", "s0.x"]),
                   st.sampled_from(["jpg", "png", "json", "txt", "cap", "bin", ""]),
                   st.one_of(st.sampled_from(list(IMAGES.values())), st.binary(max_size=64),
                             record_fields().map(lambda r: json.dumps(r).encode())))


@FUZZ
@given(st.lists(MEMBER, max_size=8), st.one_of(st.none(), st.floats(0, 1)), st.one_of(st.none(), st.integers(0, 10**6)))
def test_webdataset_tars(members, cut, flip):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = bytearray(buf.getvalue())
    if flip is not None:
        blob[flip % len(blob)] ^= 0x41  # damage one byte: a header, a member or the end marker
    if cut is not None:
        blob = blob[: int(len(blob) * cut)]  # cut short anywhere
    with _folder() as root:
        (root / "s.tar").write_bytes(bytes(blob))
        refs, _ = accounted(root / "s.tar", "webdataset")
    if flip is None and cut is None:  # intact: every distinct sample key is seen once or more
        keys = {(f"{k}.{e}" if e else k).split("/")[-1].split(".")[0] for k, e, _ in members}
        assert len(refs) >= len(keys)


@FUZZ
@given(st.one_of(TEXT, st.binary(max_size=40), JSON))
def test_text_cleaner_returns_tag_free_text_or_a_text_reject(value):
    try:
        out = normalize(value)
    except TextReject as e:
        assert e.reason in ("invalid_encoding", "bad_field_type")
        return
    assert isinstance(out, str) and _TAG.search(out) is None and out == out.strip()
    out.encode("utf-8")  # always writable


@FUZZ
@given(st.one_of(st.lists(JSON, max_size=4), JSON), st.one_of(QA, JSON))
def test_caption_and_qa_cleaning_never_raises(captions, qa):
    kept, dropped = clean_captions(captions, CFG.min_caption_chars, CFG.max_caption_chars)
    assert all(isinstance(c, str) and c for c in kept) and all(isinstance(r, str) for r in dropped)
    pairs, reasons = clean_qa(qa, CFG.max_caption_chars)
    assert all(p["question"] and p["answers"] and all(isinstance(a, str) and a for a in p["answers"]) for p in pairs)
