"""The synthetic captioned-shapes set: deterministic, consistent captions and answers."""

from __future__ import annotations

import hashlib
import json

from pipelines.ingest.synth import COLORS, SHAPES, make_sample, synthesize


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_and_prefix_stable(tmp_path):
    a = synthesize(tmp_path / "a", num=20, seed=5)
    b = synthesize(tmp_path / "b", num=20, seed=5)
    assert _digest(a) == _digest(b)
    small = (synthesize(tmp_path / "c", num=8, seed=5) / "samples.jsonl").read_text().splitlines()
    assert small == (a / "samples.jsonl").read_text().splitlines()[:8]
    other = synthesize(tmp_path / "d", num=20, seed=6)
    assert _digest(other) != _digest(a)


def test_captions_and_answers_describe_the_scene(tmp_path):
    src = synthesize(tmp_path / "s", num=60, seed=0)
    counts = set()
    for line in (src / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        shapes = rec["meta"]["shapes"]
        counts.add(len(shapes))
        assert (src / rec["image"]).is_file() and len(rec["captions"]) == 5
        for cap in rec["captions"]:
            for s in shapes:  # every caption names every shape with its size and colour
                assert f"{s['size']} {s['color']} {s['shape']}" in cap
        xs = [s["x"] for s in shapes]
        assert xs == sorted(xs)  # shapes are listed left to right
        qa = {q["question"]: q["answers"][0] for q in rec["qa"]}
        assert qa["how many shapes are there?"] == ["one", "two", "three"][len(shapes) - 1]
        for s in shapes:
            if f"what color is the {s['shape']}?" in qa:
                assert qa[f"what color is the {s['shape']}?"] == s["color"]
    assert counts == {1, 2, 3}


def test_vocabulary_is_small_and_scenes_vary():
    words = set()
    scenes = set()
    for i in range(200):
        rec, img = make_sample(0, i)
        words |= {w for c in rec["captions"] for w in c.split()}
        scenes.add(tuple((s["shape"], s["color"], s["size"], s["position"]) for s in rec["meta"]["shapes"]))
        assert img.size == (112, 112) and img.mode == "RGB"
    assert len(words) < 60 and set(COLORS) | set(SHAPES) <= words
    assert len(scenes) > 150  # few repeated scenes: the set is not a handful of templates
