"""Shards assembled from staged tar members are the tars webdataset's TarWriter writes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import webdataset as wds

from pipelines.core.dataset import entries_by_split, read_shard
from pipelines.core.storage import write_bytes_atomic
from pipelines.ingest.shards import (
    TAR_MTIME,
    TAR_OWNER,
    MemberWriter,
    archive_bytes,
    archive_end,
    parse_members,
    plan_shards,
    write_shard,
)


def _sample(i: int, captions: list[str]) -> dict:
    doc = {"id": f"s{i}", "captions": captions, "qa": [], "split": "train"}
    return {"__key__": f"s{i:03d}", "jpg": bytes([i % 256]) * (700 + 37 * i), "txt": captions[0].encode(),
            "json": json.dumps(doc, ensure_ascii=False).encode()}


def _reference_tar(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    w = wds.TarWriter(buf, encoder=False, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER)
    for s in samples:
        w.write(s)
    w.close()
    return buf.getvalue()


def _stage(tmp_path, name: str, samples: list[dict]) -> list[dict]:
    """Stage samples like a cleaning task does; returns their accounting rows."""
    writer, rows = MemberWriter(), []
    for s in samples:
        offset, length = writer.add(s)
        rows.append({"key": s["__key__"], "split": "train", "stage_file": str(tmp_path / name),
                     "stage_offset": offset, "nbytes": length})
    write_bytes_atomic(tmp_path / name, writer.getvalue())
    return rows


def test_staged_members_make_the_same_tar_as_tarwriter(tmp_path):
    samples = [_sample(i, [f"caption number {i}", "ünïcode é"]) for i in range(12)]
    rows = _stage(tmp_path, "a.members", samples[:5]) + _stage(tmp_path, "b.members", samples[5:])
    assert all(r["nbytes"] % 512 == 0 for r in rows)
    extra = {"s003": ["a merged caption", "another one"]}
    (plan,) = plan_shards(rows, extra, max_samples=100, max_bytes=10**9)
    entry = write_shard(plan, str(tmp_path / "v"))

    merged = dict(samples[3])
    doc = json.loads(merged["json"])
    doc["captions"] += extra["s003"]
    merged["json"] = json.dumps(doc, ensure_ascii=False).encode()
    want = _reference_tar([merged if s["__key__"] == "s003" else s for s in samples])
    got = (tmp_path / "v" / plan["path"]).read_bytes()
    assert got == want
    assert entry == {"path": plan["path"], "samples": 12, "bytes": len(want), "sha256": hashlib.sha256(want).hexdigest()}
    # archive_bytes agrees with tarfile on the size of these members (header + data in 512-byte blocks)
    with tarfile.open(fileobj=io.BytesIO(want)) as tar:
        members = sum(512 + -(-m.size // 512) * 512 for m in tar)
    assert len(got) == archive_bytes(members)
    back = list(read_shard(str(tmp_path / "v" / plan["path"])))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in samples]
    assert json.loads(back[3]["json"])["captions"][-2:] == extra["s003"]
    assert back[7]["jpg"] == samples[7]["jpg"]


def test_shard_plans_group_back_by_split_keeping_their_order():
    """The manifest's `splits` (and the report's per-split counts) come from the plans' paths."""
    rows = [{"key": f"k{i}", "split": ("train", "test", "val")[i % 3], "stage_file": "f", "stage_offset": 0,
             "nbytes": 100} for i in range(9)]
    plans = plan_shards(rows, {}, max_samples=2, max_bytes=10**6)
    grouped = entries_by_split([{"path": p["path"]} for p in reversed(plans)])
    assert list(grouped) == ["train", "val", "test"]
    assert {s: [e["path"] for e in v] for s, v in grouped.items()} == {
        s: [f"{s}/shard-{i:06d}.tar" for i in (1, 0)] for s in ("train", "val", "test")}


def test_parse_members_round_trips_a_sample():
    s = _sample(5, ["one caption"])
    writer = MemberWriter()
    offset, length = writer.add(s)
    assert parse_members(writer.getvalue()[offset : offset + length], s["__key__"]) == s


def test_member_writer_streams_to_a_file_without_the_end_marker(tmp_path):
    """Cleaning tasks stream members into their staging file: the same bytes as in memory, the
    offsets point at each sample, and the tar end marker is never written."""
    samples = [_sample(i, [f"caption {i}"]) for i in range(7)]
    in_memory = MemberWriter()
    spans = [in_memory.add(s) for s in samples]
    with open(tmp_path / "a.members", "wb") as f:
        streamed = MemberWriter(f)
        assert [streamed.add(s) for s in samples] == spans
        size = streamed.finish()
    data = (tmp_path / "a.members").read_bytes()
    assert data == in_memory.getvalue() and len(data) == size == spans[-1][0] + spans[-1][1]
    assert _reference_tar(samples) == data + archive_end(len(data))
    for s, (offset, length) in zip(samples, spans, strict=True):
        assert parse_members(data[offset : offset + length], s["__key__"]) == s


def test_member_headers_are_tarfiles_for_any_name_and_size():
    """The headers built from parts (ASCII names up to 100 bytes) and those `tarfile` makes (pax
    headers: longer or non-ASCII names) give the tar webdataset's TarWriter writes."""
    samples = [
        {"__key__": "k", "jpg": b"", "txt": b"x" * 512, "json": b"{}" * 300},
        {"__key__": "a" * 96, "txt": b"exactly a 100-byte name", "jpg": bytes(513)},
        {"__key__": "b" * 97, "txt": b"a 101-byte name: pax", "json": bytes(1023)},
        {"__key__": "ünïcode-é", "txt": b"non-ASCII name: pax", "jpg": bytes(range(256)) * 9},
        {"__key__": "0" * 64, "txt": memoryview(b"a memoryview"), "jpg": bytearray(b"\xff" * 4097)},
    ]
    writer = MemberWriter()
    spans = [writer.add(s) for s in samples]
    data = writer.getvalue()
    assert _reference_tar(samples) == data + archive_end(len(data))
    assert writer.finish() == len(data) == spans[-1][0] + spans[-1][1]
    for s, (offset, length) in zip(samples, spans, strict=True):
        assert parse_members(data[offset : offset + length], s["__key__"]) == {k: bytes(v) if k != "__key__" else v
                                                                           for k, v in s.items()}


def test_byte_cap_counts_merged_captions(tmp_path):
    samples = [_sample(i, [f"caption {i}"]) for i in range(6)]
    rows = _stage(tmp_path, "a.members", samples)
    cap = archive_bytes(sum(r["nbytes"] for r in rows[:3]))
    plain = plan_shards(rows, {}, max_samples=100, max_bytes=cap)
    extra = {"s001": ["x" * 12000]}  # more than a tar record: the first shard must close earlier
    plans = plan_shards(rows, extra, max_samples=100, max_bytes=cap)
    assert len(plans[0]["members"]) < len(plain[0]["members"])
    for plan in plans:
        assert write_shard(plan, str(tmp_path / "v"))["bytes"] <= cap


def test_dropped_samples_leave_gaps_that_the_shard_skips(tmp_path):
    """Samples dropped between staging and shard writing (duplicates) are not copied, whichever
    staging file they sit in: the shard is the reference tar of what is left."""
    samples = [_sample(i, [f"caption {i}"]) for i in range(10)]
    rows = _stage(tmp_path, "a.members", samples[:6]) + _stage(tmp_path, "b.members", samples[6:])
    keep = [r for r in rows if r["key"] not in {"s000", "s002", "s003", "s005", "s006", "s009"}]
    (plan,) = plan_shards(keep, {}, max_samples=100, max_bytes=10**9)
    write_shard(plan, str(tmp_path / "v"))
    want = _reference_tar([s for s in samples if s["__key__"] in {r["key"] for r in keep}])
    assert (tmp_path / "v" / plan["path"]).read_bytes() == want


def _mixed_plan(tmp_path):
    """Two staging files, gaps from dropped samples, one sample with merged captions."""
    samples = [_sample(i, [f"caption {i}"]) for i in range(14)]
    rows = _stage(tmp_path, "a.members", samples[:8]) + _stage(tmp_path, "b.members", samples[8:])
    keep = [r for r in rows if r["key"] not in {"s002", "s009"}]
    (plan,) = plan_shards(keep, {"s005": ["merged in"]}, max_samples=100, max_bytes=10**9)
    return plan


def test_local_fast_path_and_fsspec_path_write_the_same_shard(tmp_path):
    """Local shards are copied in the kernel and hashed through a memory map; any other storage
    goes through fsspec. Both must give the same bytes and manifest entry."""
    import fsspec

    plan = _mixed_plan(tmp_path)
    local = write_shard(plan, str(tmp_path / "v"))
    remote = write_shard(plan, "memory://versions/v")
    got = fsspec.filesystem("memory").cat_file(f"/versions/v/{plan['path']}")
    assert got == (tmp_path / "v" / plan["path"]).read_bytes()
    assert remote == local and local["sha256"] == hashlib.sha256(got).hexdigest() and local["bytes"] == len(got)
    assert [s["__key__"] for s in read_shard(str(tmp_path / "v" / plan["path"]))] == [m["key"] for m in plan["members"]]


def test_shard_copy_falls_back_when_the_kernel_refuses(tmp_path, monkeypatch):
    """copy_file_range is refused across file systems and on some kernels: the bytes then go
    through memory, and the shard is the same."""
    import errno
    import os

    plan = _mixed_plan(tmp_path)
    want = write_shard(plan, str(tmp_path / "v1"))
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    assert write_shard(plan, str(tmp_path / "v2")) == want
    assert calls, "the fast path was not taken"
    assert (tmp_path / "v2" / plan["path"]).read_bytes() == (tmp_path / "v1" / plan["path"]).read_bytes()


def test_a_staging_file_cut_short_fails_without_a_finished_shard(tmp_path):
    import pytest

    plan = _mixed_plan(tmp_path)
    staged = tmp_path / "b.members"
    staged.write_bytes(staged.read_bytes()[:-700])
    with pytest.raises(OSError, match="b.members"):
        write_shard(plan, str(tmp_path / "v"))
    assert not (tmp_path / "v" / plan["path"]).exists()  # at most a .partial: never a finished-looking shard


def test_task_sizes_cover_the_input_and_shrink_towards_the_end():
    from pipelines.ingest.driver import task_sizes

    assert task_sizes(0, 2) == []
    assert task_sizes(10, 2) == [10]
    for n, cpus in [(64, 2), (1000, 2), (10_000, 2), (40_000, 2), (10_000, 64), (123_457, 16)]:
        sizes = task_sizes(n, cpus)
        assert sum(sizes) == n
        assert max(sizes) <= 512 and min(sizes[:-1]) >= 16
        assert sizes == sorted(sizes, reverse=True) or sizes[:-1] == sorted(sizes[:-1], reverse=True)
        # the last task of each CPU is short: at most ~0.1 s of work at a few ms per sample
        assert max(sizes[-cpus:]) <= 32
    assert task_sizes(10_000, 2).count(512) >= 15  # long tasks while there is plenty left


def test_remote_inputs_clean_in_equal_tasks_a_multiple_of_the_cpus():
    """URL lists: every task ends with its slowest download, so no short tail tasks, each with
    its own wait; equal tasks, a whole number per CPU, each at most REMOTE_TASK_MOST."""
    from pipelines.ingest.driver import (
        REMOTE_TASK_MOST,
        _remote,
        cleaning_task_sizes,
        remote_task_sizes,
        task_sizes,
    )

    assert remote_task_sizes(0, 2) == []
    assert remote_task_sizes(1000, 2) == [500, 500]
    assert remote_task_sizes(3, 4) == [1, 1, 1]  # fewer inputs than CPUs: no empty tasks
    for n, cpus in [(1000, 2), (3001, 2), (10_000, 2), (123_457, 16), (5000, 1)]:
        sizes = remote_task_sizes(n, cpus)
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and max(sizes) <= REMOTE_TASK_MOST
        assert len(sizes) % cpus == 0
    assert len(remote_task_sizes(10_000, 2)) == 2  # one task per CPU: rows stream back as it goes
    assert len(remote_task_sizes(40_000, 2)) == 4
    url = {"image": {"kind": "url", "uri": "https://example.com/a.jpg"}, "audio": None}
    s3 = {"image": {"kind": "path", "uri": "s3://bucket/a.jpg"}}
    local = {"image": {"kind": "path", "uri": "/data/a.jpg"}, "audio": {"kind": "path", "uri": "/data/a.flac"}}
    spoken = {"image": None, "audio": {"kind": "url", "uri": "http://example.com/a.flac"}}
    file_uri = {"image": {"kind": "path", "uri": "file:///data/a.jpg"}}
    assert [_remote(r) for r in (url, s3, local, spoken, file_uri, {"image": None})] == \
        [True, True, False, True, False, False]
    # one remote Ref makes the whole input remote; local files keep the shrinking tasks
    assert cleaning_task_sizes([local] * 999 + [url], 2) == [500, 500]
    assert cleaning_task_sizes([local] * 1000, 2) == task_sizes(1000, 2)


def test_cleaning_runs_one_task_per_chunk_and_returns_every_row_in_input_order(ray_local, tmp_path, monkeypatch):
    """`_clean_all` runs one Ray task per planned chunk (each stages its samples in files named by
    its first input) and hands back every input's row once, in input order, as tasks end."""
    import os

    from ingest_corpus import encode, scene

    from pipelines.config import load_config
    from pipelines.ingest import driver

    (tmp_path / "src").mkdir()
    lines = []
    for i in range(13):
        if i != 7:  # one missing image: its task still returns its row
            (tmp_path / "src" / f"{i}.jpg").write_bytes(encode(scene(i).resize((64, 48))))
        lines.append(json.dumps({"id": f"s{i}", "image": f"{i}.jpg", "captions": [f"scene number {i} here"]}))
    (tmp_path / "src" / "samples.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config("local", ["data.image_size=32", "data.min_side=16"]).data
    refs = driver.collect_refs(str(tmp_path / "src" / "samples.jsonl"), "jsonl", cfg)
    monkeypatch.setattr(driver, "cleaning_task_sizes", lambda refs, cpus: [5, 1, 3, 4])
    rows = driver._clean_all(refs, cfg, str(tmp_path / "stage"), hash_files=True)
    assert [r["order"] for r in rows] == list(range(13))
    assert [r["reason"] for r in rows] == [""] * 7 + ["missing_image"] + [""] * 5
    firsts = {int(os.path.basename(r["stage_file"]).split("-")[1]) for r in rows if not r["reason"]}
    assert firsts == {0, 5, 6, 9}  # one task per chunk, named by its first input


def test_an_empty_source_gives_an_empty_complete_version(ray_local, tmp_path):
    import gc

    from pipelines.config import load_config
    from pipelines.core.dataset import read_manifest, read_report
    from pipelines.ingest import ingest

    (tmp_path / "samples.jsonl").write_text("")
    cfg = load_config("local").data
    vdir = ingest(tmp_path / "samples.jsonl", tmp_path / "out", cfg)
    report, manifest = read_report(vdir), read_manifest(vdir)
    assert (report["seen"], report["kept"], report["duplicates"], report["rejected"]) == (0, 0, 0, {})
    assert manifest["splits"] == {"train": [], "val": [], "test": []}
    assert ingest(tmp_path / "samples.jsonl", tmp_path / "out", cfg) == vdir  # and a re-run is a no-op
    # the driver pauses cyclic GC while it builds Refs and rows; both the full run and the early
    # return of the re-run must hand it back on
    assert gc.isenabled()


def test_ref_chunks_follow_task_sizes_in_input_order():
    from pipelines.ingest.driver import ref_chunks, task_sizes

    refs = [{"order": i, "captions": ["a cat"]} for i in range(3000)]
    chunks = ref_chunks(refs, task_sizes(3000, 2))
    assert [len(c) for c in chunks] == task_sizes(3000, 2)
    assert [json.loads(line)["order"] for c in chunks for line in c] == list(range(3000))  # all, in order
    assert ref_chunks([], task_sizes(0, 2)) == []


def test_the_tokenizer_texts_from_the_rows_are_what_the_train_shards_hold(tmp_path):
    """Ingest trains the tokenizer on `train_texts` (the accounting rows) instead of reading the
    train shards back: the same texts in the same order, merged captions and QA pairs included,
    and a QA-only sample's empty primary caption."""
    from pipelines.core.dataset import sample_texts
    from pipelines.ingest.dedup import DedupResult
    from pipelines.ingest.driver import train_texts

    docs = [(["a red circle", "a round red thing"], []), ([], [{"question": "how many?", "answers": ["two", "2"]}]),
            (["a blue square"], [{"question": "colour?", "answers": ["blue"]}]), (["ünïcode é"], [])]
    samples, rows = [], []
    for i, (captions, qa) in enumerate(docs * 2):
        split = "train" if i % 4 != 3 else "val"
        doc = {"id": f"s{i}", "captions": captions, "qa": qa, "split": split}
        samples.append({"__key__": f"s{i:03d}", "jpg": b"\xff" * 600, "txt": (captions[:1] or [""])[0].encode(),
                        "json": json.dumps(doc, ensure_ascii=False).encode()})
        rows.append({"split": split, "captions": json.dumps(captions), "qa": json.dumps(qa)})
    staged = _stage(tmp_path, "a.members", samples)
    kept = [{**s, **row} for row, s in zip(rows, staged, strict=True)]
    kept[5]["merged_qa"] = [{"question": "merged?", "answers": ["yes"]}]  # QA-only, with a merged pair
    result = DedupResult(kept=kept, extra_captions={"s000": ["a merged caption"], "s001": ["one for a QA-only"]})
    plans = plan_shards(result.kept, result.extra_captions, max_samples=3, max_bytes=10**9)
    urls = [str(tmp_path / "v" / write_shard(p, str(tmp_path / "v"))["path"]) for p in plans if p["split"] == "train"]
    assert len(urls) == 2
    assert list(train_texts(result)) == list(sample_texts(urls))
    assert "" in train_texts(result) and "merged?" in train_texts(result)


def test_import_soon_imports_on_a_thread_and_leaves_errors_to_the_main_import(tmp_path, monkeypatch):
    """The driver imports the tokenizer's modules while the workers clean (`import_soon`): the
    module is loaded once the thread ends, at the lowest CPU priority; a module that fails to
    import raises nothing there."""
    import os
    import sys
    import threading

    from pipelines.ingest.driver import import_soon

    (tmp_path / "soon_ok.py").write_text("import os, threading\n"
                                         "NICE = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())\n")
    (tmp_path / "soon_bad.py").write_text("raise ImportError('not here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    import_soon("soon_ok").join(timeout=30)
    assert sys.modules["soon_ok"].NICE == 19  # imported at the lowest priority: only idle CPU time
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller's is its own
    import_soon("soon_bad").join(timeout=30)
    assert "soon_bad" not in sys.modules
    with pytest.raises(ImportError, match="not here"):
        import soon_bad  # noqa: F401


def test_a_failed_stream_runs_again_on_the_inputs_whose_rows_have_not_come_back(ray_local):
    """`_stream_rows`: Ray's own retry would replay a streaming task and expect the same outputs;
    instead the driver starts it again on the inputs not handed back yet (each row once), up to
    `retries` times, then raises."""
    from pipelines.ingest.driver import _stream_rows

    def flaky_stream(lines: list[str], attempt: int, fail_until: int, most: int = 3):
        """A streaming cleaning task's stand-in (defined here so that Ray ships it by value): rows
        `most` at a time; attempts below `fail_until` fail with an OSError after one list."""
        rows = [{"order": json.loads(line)["order"], "attempt": attempt} for line in lines]
        for start in range(0, len(rows), most):
            if start and attempt < fail_until:
                raise OSError(28, "No space left on device")
            yield rows[start : start + most]

    flaky = ray_local.remote(flaky_stream).options(num_cpus=1, max_retries=0)
    chunks = [[json.dumps({"order": i}) for i in range(lo, lo + 8)] for lo in (0, 8)]
    got: list[dict] = []
    _stream_rows(chunks, lambda lines, attempt: flaky.remote(lines, attempt, fail_until=1), got.extend)
    assert sorted(r["order"] for r in got) == list(range(16))  # every input once
    assert sorted((r["order"], r["attempt"]) for r in got if r["order"] < 8) == \
        [(i, 0) for i in range(3)] + [(i, 1) for i in range(3, 8)]  # the first list kept, the rest run again

    got.clear()
    with pytest.raises(OSError, match="No space left"):
        _stream_rows(chunks[:1], lambda lines, attempt: flaky.remote(lines, attempt, fail_until=9), got.extend,
                     retries=1)
    assert sorted(r["order"] for r in got) == list(range(6))  # what came back before it gave up
