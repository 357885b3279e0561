"""Ingests of the same source at the same time: separate staging, one atomic publish, and a
complete version never removed or rewritten."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines.config import load_config
from pipelines.core import dataset
from pipelines.ingest import driver as ingest_driver
from pipelines.ingest import ingest
from pipelines.ingest.inspection import validate_version
from pipelines.ingest.synth import synthesize

pytestmark = pytest.mark.timeout(600)

CFG = load_config("debug").data


def _finished_build(path, tag: str):
    """A finished version folder, as `_build_version` leaves it before publishing."""
    (path / "train").mkdir(parents=True)
    (path / "train" / "shard-000000.tar").write_text(tag)
    (path / dataset.MANIFEST).write_text(json.dumps({"version": "v", "tag": tag}))
    return path


def test_publish_never_replaces_a_complete_version(tmp_path):
    root = tmp_path / "out"
    vdir, lock = root / "v", str(root / "_staging" / "v.lock")
    assert ingest_driver.publish(str(_finished_build(tmp_path / "a", "a")), str(vdir), lock)
    inode = (vdir / dataset.MANIFEST).stat().st_ino
    assert not ingest_driver.publish(str(_finished_build(tmp_path / "b", "b")), str(vdir), lock)
    assert json.loads((vdir / dataset.MANIFEST).read_text())["tag"] == "a"
    assert (vdir / dataset.MANIFEST).stat().st_ino == inode and (tmp_path / "b").is_dir()
    assert not os.path.exists(lock)  # the lock file goes with the lock


def test_publish_replaces_the_leftovers_of_a_killed_run(tmp_path):
    vdir = tmp_path / "out" / "v"
    (vdir / "train").mkdir(parents=True)
    (vdir / "train" / "shard-000007.tar").write_text("half written")  # no manifest: incomplete
    assert ingest_driver.publish(str(_finished_build(tmp_path / "a", "a")), str(vdir), str(tmp_path / "l"))
    assert sorted(p.name for p in (vdir / "train").iterdir()) == ["shard-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no build or leftover folder


def test_many_publishers_at_once_publish_exactly_once(tmp_path):
    vdir = tmp_path / "out" / "v"
    (vdir / "train").mkdir(parents=True)
    (vdir / "train" / "junk.tar").write_text("left by a killed run")
    builds = [str(_finished_build(tmp_path / f"b{i}", str(i))) for i in range(8)]
    start = threading.Barrier(len(builds))

    def go(build: str) -> bool:
        start.wait(timeout=30)
        return ingest_driver.publish(build, str(vdir), str(tmp_path / "out" / "_staging" / "v.lock"))

    with ThreadPoolExecutor(len(builds)) as pool:
        published = list(pool.map(go, builds))
    assert published.count(True) == 1
    winner = str(published.index(True))
    assert json.loads((vdir / dataset.MANIFEST).read_text())["tag"] == winner
    assert sorted(p.name for p in (vdir / "train").iterdir()) == ["shard-000000.tar"]


class _Two:
    """Two ingests of one source in threads "A" and "B", put through a chosen interleaving by
    hooks on the ingest's own steps (the real steps run; the hooks only wait and signal)."""

    def __init__(self, tmp_path):
        self.src = synthesize(tmp_path / "raw", num=24, seed=5)
        self.out = tmp_path / "out"
        self.events = {name: threading.Event() for name in ("a_cleaned", "b_in_clean", "b_checked", "a_done")}

    def wait(self, name: str) -> None:
        assert self.events[name].wait(timeout=180), f"never happened: {name}"

    def _run(self, name: str):
        try:
            vdir = ingest(self.src, self.out, CFG)
            if name == "A":  # the version as A left it, to compare with the end state
                self.a_manifest = os.stat(vdir / dataset.MANIFEST).st_ino
            return vdir
        finally:
            if name == "A":
                self.events["a_done"].set()

    def run(self, a_cleans_first: bool = False) -> list:
        results, errors = {}, {}

        def target(name: str) -> None:
            try:
                results[name] = self._run(name)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors[name] = e

        threads = {name: threading.Thread(target=target, args=(name,), name=name, daemon=True) for name in "AB"}
        threads["A"].start()
        if a_cleans_first:
            self.wait("a_cleaned")
        threads["B"].start()
        for t in threads.values():
            t.join(timeout=300)
        assert not errors, errors
        return [results["A"], results["B"]]

    def check(self, vdirs: list) -> None:
        assert vdirs[0] == vdirs[1]
        check = validate_version(vdirs[0])
        assert check["ok"], check["problems"]
        report = dataset.read_report(vdirs[0])
        assert report["seen"] == 24 and check["samples"] == report["kept"] > 0
        assert sorted(p.name for p in self.out.iterdir()) == sorted([vdirs[0].name, dataset.INDEX_DIR])


def _me() -> str:
    return threading.current_thread().name


def test_a_second_ingest_starting_never_takes_the_first_ones_staged_samples(ray_local, tmp_path, monkeypatch):
    """A has cleaned (its samples are staged) when B starts; A writes its shards while B is
    about to clean. Runs that shared `_staging/<key>` lost A's staged samples to B's clean-up."""
    two = _Two(tmp_path)
    clean_all, write_shards = ingest_driver._clean_all, ingest_driver._write_shards

    def clean(*args, **kwargs):
        if _me() == "B":
            two.events["b_in_clean"].set()
            two.wait("a_done")
        rows = clean_all(*args, **kwargs)
        if _me() == "A":
            two.events["a_cleaned"].set()
        return rows

    def write(*args, **kwargs):
        if _me() == "A":
            two.wait("b_in_clean")
        return write_shards(*args, **kwargs)

    monkeypatch.setattr(ingest_driver, "_clean_all", clean)
    monkeypatch.setattr(ingest_driver, "_write_shards", write)
    two.check(two.run(a_cleans_first=True))


def test_a_version_completed_by_one_ingest_is_never_removed_by_another(ray_local, tmp_path, monkeypatch):
    """B finds no complete version after cleaning, and A completes it just then. B must leave A's
    version as it is (earlier, B removed it as a killed run's leftovers) and return it."""
    two = _Two(tmp_path)
    together = threading.Barrier(2, timeout=120)
    clean_all, write_shards, is_complete = ingest_driver._clean_all, ingest_driver._write_shards, dataset.is_complete
    stalled = []

    def clean(*args, **kwargs):
        together.wait()  # both have listed the source before either cleans
        return clean_all(*args, **kwargs)

    def write(*args, **kwargs):
        if _me() == "A":
            two.wait("b_checked")
        return write_shards(*args, **kwargs)

    def complete(vdir) -> bool:
        answer = is_complete(vdir)
        if _me() == "B" and not stalled:  # B's look after cleaning
            stalled.append(answer)
            two.events["b_checked"].set()
            two.wait("a_done")  # the answer goes stale: A completes the version now
        return answer

    monkeypatch.setattr(ingest_driver, "_clean_all", clean)
    monkeypatch.setattr(ingest_driver, "_write_shards", write)
    monkeypatch.setattr(dataset, "is_complete", complete)
    vdirs = two.run()
    assert stalled == [False]
    two.check(vdirs)
    assert os.stat(vdirs[0] / dataset.MANIFEST).st_ino == two.a_manifest  # A's version, untouched
