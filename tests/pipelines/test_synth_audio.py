"""The synthetic spoken set: espeak-ng speaks each scene's caption and asks its questions, in
varied voices with noise, deterministically for a seed; and it goes through ingest whole."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from pipelines.config import load_config
from pipelines.core.dataset import SPLITS, read_report, shard_paths
from pipelines.ingest import stage
from pipelines.ingest.driver import collect_refs
from pipelines.ingest.shards import parse_members
from pipelines.ingest.speech import RATE, Speaker, SpeechError, Voice, noisy
from pipelines.ingest.synth import synthesize

CFG = load_config("debug").data


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("spoken"), num=4, seed=5, audio=True)


def test_same_seed_same_bytes_and_another_seed_other_audio(spoken, tmp_path):
    again = synthesize(tmp_path / "again", num=4, seed=5, audio=True)
    assert _files(spoken) == _files(again)  # every image, FLAC and the JSONL, byte for byte
    other = synthesize(tmp_path / "other", num=1, seed=6, audio=True)
    assert _files(other)["audio/shapes-s6-000000.flac"] != _files(spoken)["audio/shapes-s5-000000.flac"]


def test_audio_is_an_addition_the_image_set_is_unchanged(spoken, tmp_path):
    plain = synthesize(tmp_path / "plain", num=4, seed=5)
    assert not (plain / "audio").exists()
    files = _files(spoken)
    assert {k: v for k, v in _files(plain).items() if k.startswith("images/")} == {
        k: v for k, v in files.items() if k.startswith("images/")}
    for with_audio, without in zip(_records(spoken), _records(plain), strict=True):
        speech = with_audio["meta"].pop("speech")
        assert with_audio.pop("audio") == f"audio/{with_audio['id']}.flac"
        assert [p.pop("audio") for p in with_audio["qa"]] == [
            f"audio/{with_audio['id']}-q{k}.flac" for k in range(len(without["qa"]))]
        assert with_audio == without
        assert len(speech["questions"]) == len(without["qa"])


def test_every_caption_and_question_is_spoken_in_varied_voices(spoken):
    records = _records(spoken)
    voices, durations = set(), []
    for r in records:
        for rel, who in [(r["audio"], r["meta"]["speech"]["caption"])] + [
                (p["audio"], v) for p, v in zip(r["qa"], r["meta"]["speech"]["questions"], strict=True)]:
            x, rate = sf.read(spoken / rel, dtype="float32")
            assert rate == RATE and x.ndim == 1 and 0.05 < np.abs(x).max() < 1.0
            assert len(x) / rate == pytest.approx(who["seconds"], abs=1e-3)
            voices.add((who["voice"], who["speed"], who["pitch"]))
            durations.append(len(x) / rate)
    assert len(voices) >= 8  # 24 utterances: several voices, speeds and pitches
    assert min(durations) > 0.8 and max(durations) < 15
    # a long caption takes longer to say than "how many shapes are there?"
    caption_s = [r["meta"]["speech"]["caption"]["seconds"] for r in records]
    count_q_s = [r["meta"]["speech"]["questions"][0]["seconds"] for r in records]
    assert np.mean(caption_s) > np.mean(count_q_s) + 0.5


def test_one_text_in_one_voice_is_never_the_same_waveform_twice():
    speaker = Speaker()
    voice = Voice("en-us", 165, 40)
    clean = speaker.clean("how many shapes are there?", voice)
    assert speaker.clean("how many shapes are there?", voice) is clean and speaker.calls == 1  # cached
    a, b = (noisy(clean, np.random.default_rng(s)) for s in (1, 2))
    assert not np.array_equal(a, b)
    # the speech is there under the noise: the noisy copy correlates with espeak-ng's samples
    lag = int(np.argmax(np.correlate(a, clean, mode="valid")))
    assert np.corrcoef(a[lag : lag + len(clean)], clean)[0, 1] > 0.7


def test_without_espeak_the_error_names_the_package_and_the_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no espeak-ng on the PATH
    with pytest.raises(SpeechError, match=r"apt-get install espeak-ng.*data.synth_audio: false"):
        synthesize(tmp_path / "x", num=1, seed=0, audio=True)


def test_spoken_questions_become_members_of_their_sample(spoken, tmp_path):
    refs = collect_refs(str(spoken), "jsonl", CFG)
    rows = stage.process_batch([json.dumps(r) for r in refs], CFG.model_dump(mode="json"), str(tmp_path / "stage"))
    assert [r["reason"] for r in rows] == [""] * 4
    for row in rows:
        with open(row["stage_file"], "rb") as f:
            f.seek(row["stage_offset"])
            sample = parse_members(f.read(row["nbytes"]), row["key"])
        qa = json.loads(sample["json"])["qa"]
        assert [p["audio"] for p in qa] == [f"q{k}.flac" for k in range(len(qa))]
        for name in ["flac"] + [p["audio"] for p in qa]:
            x, rate = sf.read(io.BytesIO(sample[name]))
            assert rate == 16_000 and x.ndim == 1


def test_the_spoken_set_ingests_on_ray_and_validates(ray_local, spoken, tmp_path):
    from pipelines.ingest import ingest
    from pipelines.ingest.inspection import validate_version

    vdir = ingest(spoken, tmp_path / "out", CFG)
    report = read_report(vdir)
    assert (report["seen"], report["kept"], report["media"]["images"], report["media"]["audio"]) == (4, 4, 4, 4)
    assert validate_version(vdir)["ok"]
    samples = [s for split in SPLITS for s in (wds.WebDataset(shard_paths(vdir, split), shardshuffle=False)
                                               if shard_paths(vdir, split) else [])]
    assert len(samples) == 4
    for s in samples:
        assert {"jpg", "flac", "txt", "json"} <= set(s) and sum(k.endswith(".flac") and k != "flac" for k in s) == 5
