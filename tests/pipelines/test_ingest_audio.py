"""Audio through ingest: the cleaner on every awkward and broken input (kept after conversion or
rejected with a reason, never a crash), the three audio sources (JSONL `audio`, an audio folder
with sidecars, AudioCaps/Clotho CSVs), the cleaning step in-process, and one whole ingest on Ray
whose shards carry `flac` members."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from audio_corpus import bad_corpus, encode_audio, tone
from ingest_corpus import encode, scene, stage_rows

from pipelines.config import load_config
from pipelines.core.dataset import SPLITS, read_manifest, read_report, shard_paths
from pipelines.ingest.audioclean import AudioReject, AudioSpec, clean_audio
from pipelines.ingest.dedup import deduplicate
from pipelines.ingest.sources import detect_format

CFG = load_config("debug").data
SPEC = AudioSpec.of(CFG)
CAPTION = "a dog barks twice"
CORPUS = bad_corpus()


def _outcome(data: bytes) -> str:
    try:
        clean_audio(data, SPEC)
    except AudioReject as e:
        return e.reason
    return "kept"


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_bad_or_awkward_file_is_kept_after_conversion_or_rejected_with_its_reason(name):
    data, expected = CORPUS[name]
    assert _outcome(data) == expected


def test_the_one_hour_file_is_refused_from_its_header_without_decoding(monkeypatch):
    from pipelines.ingest import audioclean

    def no_decoding(*args):
        raise AssertionError("decoded a file the header already refuses")

    monkeypatch.setattr(audioclean, "_decode_mono", no_decoding)
    with pytest.raises(AudioReject) as e:
        clean_audio(CORPUS["one_hour.wav"][0], SPEC)
    assert e.value.reason == "too_long" and "3600.0 s > data.max_audio_s = 60.0" in e.value.detail


def _decoded(flac: bytes) -> tuple[np.ndarray, sf._SoundFileInfo]:
    info = sf.info(io.BytesIO(flac))
    return sf.read(io.BytesIO(flac), dtype="float32")[0], info


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize(("rate", "channels", "subtype"), [(44_100, 6, "PCM_16"), (48_000, 2, "PCM_24"),
                                                            (8000, 1, "PCM_U8"), (22_050, 1, "FLOAT")])
def test_audio_becomes_mono_16k_16bit_flac_with_its_content_kept(rate, channels, subtype):
    x = tone(1.5, rate=rate, freq=440.0, channels=channels)
    x[:, -1] *= 0.5  # channels differ: the downmix is their mean
    got = clean_audio(encode_audio(x, rate, "WAV", subtype), SPEC)
    y, info = _decoded(got.flac)
    assert (info.format, info.subtype, info.channels, info.samplerate) == ("FLAC", "PCM_16", 1, 16_000)
    assert (got.sample_rate, got.channels, got.subtype) == (rate, channels, subtype)
    assert abs(len(y) - 1.5 * 16_000) <= 2 and got.duration_s == pytest.approx(1.5, abs=1e-3)
    assert _peak_hz(y, 16_000) == pytest.approx(440.0, abs=2.0)  # resampled, not re-pitched
    want_amp = 0.5 * (channels - 0.5) / channels  # one channel at half amplitude, the rest at full
    assert np.abs(y[1000:-1000]).max() == pytest.approx(want_amp, abs=0.05)


def test_mp3_bytes_named_wav_decode_as_the_mp3_they_are():
    got = clean_audio(CORPUS["mp3_named.wav"][0], SPEC)
    y, _ = _decoded(got.flac)
    assert got.format == "MP3" and _peak_hz(y, 16_000) == pytest.approx(440.0, abs=3.0)


def test_cleaning_is_deterministic_and_the_hash_is_of_the_samples():
    data = encode_audio(tone(1.0, rate=44_100, channels=2), 44_100)
    a, b = clean_audio(data, SPEC), clean_audio(data, SPEC)
    assert a.flac == b.flac and a.pcm_sha == b.pcm_sha
    other = clean_audio(encode_audio(tone(1.0, rate=44_100, channels=2, seed=1), 44_100), SPEC)
    assert other.pcm_sha != a.pcm_sha
    # the same 16-bit samples in another container are the same audio
    pcm = (tone(1.0, rate=44_100, channels=2) * 32767).astype(np.int16)
    wav, flac = (clean_audio(encode_audio(pcm, 44_100, fmt, "PCM_16"), SPEC) for fmt in ("WAV", "FLAC"))
    assert wav.pcm_sha == flac.pcm_sha and wav.flac == flac.flac


def test_limits_come_from_the_config():
    spec = AudioSpec.of(load_config("debug", ["data.max_audio_s=0.5", "data.max_audio_bytes=1000"]).data)
    with pytest.raises(AudioReject, match="data.max_audio_bytes = 1000"):
        clean_audio(encode_audio(tone(0.4), 16_000), spec)
    spec = AudioSpec.of(load_config("debug", ["data.max_audio_s=0.5"]).data)
    assert _reason(encode_audio(tone(0.6), 16_000), spec) == "too_long"
    assert _reason(encode_audio(tone(0.4), 16_000), spec) == "kept"


def _reason(data: bytes, spec: AudioSpec) -> str:
    try:
        clean_audio(data, spec)
    except AudioReject as e:
        return e.reason
    return "kept"


# ----------------------------------------------------------------------------- sources + cleaning step


def process(source, fmt: str, tmp_path: Path, cfg=CFG) -> list[dict]:
    return stage_rows(source, fmt, tmp_path, cfg)


def _staged(row: dict) -> dict:
    """The tar members the cleaning step staged for a kept row."""
    from pipelines.ingest.shards import parse_members

    with open(row["stage_file"], "rb") as f:
        f.seek(row["stage_offset"])
        return parse_members(f.read(row["nbytes"]), row["key"])


@pytest.fixture
def media(tmp_path) -> Path:
    """`a/0.wav` .. `a/3.wav` (distinct clips at assorted rates), `img/0.jpg`, `img/1.jpg`, and
    every file of the bad corpus under `bad/`."""
    for d in ("a", "img", "bad"):
        (tmp_path / d).mkdir()
    for i, rate in enumerate((16_000, 44_100, 22_050, 8000)):
        (tmp_path / "a" / f"{i}.wav").write_bytes(encode_audio(tone(1.0, rate=rate, seed=i), rate))
    for i in range(2):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(encode(scene(40 + i)))
    for name, (data, _) in CORPUS.items():
        (tmp_path / "bad" / name).write_bytes(data)
    return tmp_path


def _jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_jsonl_audio_beside_or_instead_of_an_image(media, tmp_path):
    src = _jsonl(media / "raw.jsonl", [
        {"id": "both", "image": "img/0.jpg", "audio": "a/1.wav", "captions": [CAPTION]},
        {"id": "audio", "audio": "a/2.wav", "captions": [CAPTION]},
        {"id": "image", "image": "img/1.jpg", "captions": [CAPTION]},
        {"id": "neither", "captions": [CAPTION]},
        {"id": "notstr", "audio": ["a/0.wav"], "captions": [CAPTION]},
        {"id": "gone", "audio": "a/missing.wav", "captions": [CAPTION]},
    ])
    rows = {r["id"]: r for r in process(src, "jsonl", tmp_path)}
    assert {k: r["reason"] for k, r in rows.items()} == {
        "both": "", "audio": "", "image": "", "neither": "missing_field", "notstr": "bad_field_type",
        "gone": "missing_audio"}
    assert "image (or audio)" in rows["neither"]["detail"] and "'audio' must be a path" in rows["notstr"]["detail"]
    both, audio, image = (_staged(rows[k]) for k in ("both", "audio", "image"))
    assert set(both) == {"__key__", "jpg", "flac", "txt", "json"}
    assert set(audio) == {"__key__", "flac", "txt", "json"} and set(image) == {"__key__", "jpg", "txt", "json"}
    doc = json.loads(audio["json"])
    assert doc["audio"] == {"duration_s": 1.0, "sample_rate": 22_050, "channels": 1, "format": "WAV",
                            "subtype": "PCM_16"} and "width" not in doc
    assert rows["audio"]["audio_sha"] and not rows["audio"]["pixel_sha"] and not rows["audio"]["phash"]
    assert rows["both"]["audio_sha"] and rows["both"]["pixel_sha"] and not rows["image"]["audio_sha"]


def test_every_bad_audio_file_is_one_row_with_its_reason(media, tmp_path):
    src = _jsonl(media / "bad.jsonl", [{"id": n, "audio": f"bad/{n}", "captions": [CAPTION]} for n in sorted(CORPUS)])
    rows = process(src, "jsonl", tmp_path)
    want = {n: "" if r == "kept" else r for n, (_, r) in CORPUS.items()}
    assert {r["id"]: r["reason"] for r in rows} == want
    assert all(r["detail"] for r in rows if r["reason"])


def test_an_audio_folder_with_sidecars_pairs_same_stem_images(media, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"clip{i}.flac").write_bytes(encode_audio(tone(1.0, seed=10 + i), 16_000, "FLAC"))
        (folder / f"clip{i}.txt").write_text(f"{CAPTION} number {i}\nsecond caption\n")
    (folder / "clip1.jpg").write_bytes(encode(scene(50)))  # clip1: an image with its audio
    (folder / "nocap.wav").write_bytes(encode_audio(tone(1.0, seed=20), 16_000))
    assert detect_format(str(folder)) == "folder"
    rows = {r["id"]: r for r in process(folder, "folder", tmp_path)}
    assert {k: r["reason"] for k, r in rows.items()} == {"clip0": "", "clip1": "", "clip2": "",
                                                         "nocap": "no_captions"}
    assert set(_staged(rows["clip1"])) == {"__key__", "jpg", "flac", "txt", "json"}
    assert set(_staged(rows["clip0"])) == {"__key__", "flac", "txt", "json"}
    assert json.loads(rows["clip2"]["captions"]) == [f"{CAPTION} number 2", "second caption"]


def test_audiocaps_and_clotho_csvs(media, tmp_path):
    with open(media / "audiocaps.csv", "w", newline="") as f:  # one caption a row, grouped by file
        csv.writer(f).writerows([["file", "caption"], ["a/0.wav", CAPTION], ["a/1.wav", "rain on a roof"],
                                 ["a/0.wav", "a dog barking outside"], ["", "no file"]])
    rows = process(media / "audiocaps.csv", "csv", tmp_path)
    assert [(r["reason"], json.loads(r["captions"])) for r in rows] == [
        ("missing_field", []), ("", [CAPTION, "a dog barking outside"]), ("", ["rain on a roof"])]
    with open(media / "clotho.csv", "w", newline="") as f:  # Clotho: file_name, caption_1 .. caption_5
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        w.writerow(["a/2.wav"] + [f"caption {i} of clip two" for i in range(1, 6)])
        w.writerow(["a/3.wav"] + [f"caption {i} of clip three" for i in range(1, 6)])
    rows = process(media / "clotho.csv", "csv", tmp_path)
    assert [r["reason"] for r in rows] == ["", ""] and all(r["audio_sha"] and not r["image"] for r in rows)
    assert json.loads(rows[0]["captions"])[4] == "caption 5 of clip two"
    with open(media / "none.csv", "w", newline="") as f:
        csv.writer(f).writerows([["name", "caption"], ["a/0.wav", CAPTION]])
    with pytest.raises(KeyError, match="data.columns.audio=<name>"):
        process(media / "none.csv", "csv", tmp_path)


def test_exact_audio_duplicates_are_merged_and_different_audio_on_one_image_is_not(media, tmp_path):
    pcm, rate = sf.read(media / "a" / "1.wav", dtype="int16")
    (media / "a" / "copy.flac").write_bytes(encode_audio(pcm, rate, "FLAC", "PCM_16"))  # a/1.wav as FLAC
    src = _jsonl(media / "dup.jsonl", [
        {"id": "orig", "audio": "a/1.wav", "captions": [CAPTION]},
        {"id": "copy", "audio": "a/copy.flac", "captions": ["another caption of it"]},  # same samples, FLAC
        {"id": "img-a", "image": "img/0.jpg", "audio": "a/2.wav", "captions": [CAPTION]},
        {"id": "img-b", "image": "img/0.jpg", "audio": "a/3.wav", "captions": [CAPTION]},  # same image, other audio
        {"id": "img-c", "image": "img/0.jpg", "audio": "a/2.wav", "captions": [CAPTION]},  # a copy of img-a
    ])
    rows = [r for r in process(src, "jsonl", tmp_path) if not r["reason"]]
    result = deduplicate(rows, CFG.dedup_distance)
    assert sorted(r["id"] for r in result.kept) == ["copy", "img-a", "img-b"]  # the smallest key is kept
    by_key = {r["key"]: r["id"] for r in rows}
    assert sorted((by_key[d["key"]], d["reason"], by_key[d["of"]]) for d in result.dropped) == [
        ("img-c", "duplicate_exact", "img-a"), ("orig", "duplicate_merged", "copy")]
    assert result.extra_captions == {"copy": [CAPTION]}


def test_spoken_questions_are_members_and_a_bad_one_rejects_its_sample(media, tmp_path):
    src = _jsonl(media / "qa.jsonl", [
        {"id": "ok", "image": "img/0.jpg", "qa": [{"question": "what is it?", "answers": ["a dog"], "audio": "a/1.wav"},
                                                  {"question": "is it loud?", "answers": ["yes"]}]},
        {"id": "bad", "image": "img/1.jpg", "captions": [CAPTION],
         "qa": [{"question": "what is it?", "answers": ["a dog"], "audio": "bad/truncated.flac"}]},
        {"id": "copy", "image": "img/0.jpg", "qa": [{"question": "what else?", "answers": ["rain"], "audio": "a/2.wav"}]},
    ])
    rows = {r["id"]: r for r in process(src, "jsonl", tmp_path)}
    assert (rows["ok"]["reason"], rows["bad"]["reason"]) == ("", "truncated_audio")
    assert rows["bad"]["detail"].startswith("question 0 spoken: ")
    sample = _staged(rows["ok"])
    assert set(sample) == {"__key__", "jpg", "txt", "json", "q0.flac"}  # no `flac`: the caption is not spoken
    assert json.loads(sample["json"])["qa"] == [{"question": "what is it?", "answers": ["a dog"], "audio": "q0.flac"},
                                                {"question": "is it loud?", "answers": ["yes"]}]
    # an exact duplicate's spoken question merges as text only: its audio is a member of the dropped sample
    result = deduplicate([rows["ok"], rows["copy"]], CFG.dedup_distance)
    assert [r["id"] for r in result.kept] == ["copy"]
    assert result.kept[0]["merged_qa"] == [{"question": "what is it?", "answers": ["a dog"]},
                                           {"question": "is it loud?", "answers": ["yes"]}]


# ----------------------------------------------------------------------------- the whole job


def test_an_ingest_with_audio_writes_flac_members_and_counts_them(ray_local, media, tmp_path, capsys):
    from pipelines.ingest import ingest
    from pipelines.ingest.inspection import inspect_version, validate_version

    lines = [{"id": f"s{i}", "audio": f"a/{i}.wav", "captions": [f"{CAPTION} {i}"]} for i in range(4)]
    lines += [{"id": "both", "image": "img/0.jpg", "audio": "a/0.wav", "captions": [CAPTION]},
              {"id": "img", "image": "img/1.jpg", "captions": [CAPTION]},
              {"id": "dup", "audio": "a/3.wav", "captions": [f"{CAPTION} 3"]}]
    lines += [{"id": n, "audio": f"bad/{n}", "captions": [CAPTION]} for n in sorted(CORPUS)]
    cfg = load_config("debug", ["data.split_fractions={train: 1.0}"]).data
    vdir = ingest(_jsonl(media / "raw.jsonl", lines), tmp_path / "out", cfg)
    report, manifest = read_report(vdir), read_manifest(vdir)
    kept_bad = sum(r == "kept" for _, r in CORPUS.values())
    assert (report["seen"], report["kept"], report["duplicates"]) == (len(lines), 6 + kept_bad, 1)
    assert report["rejected"] == {r: 1 for _, r in CORPUS.values() if r != "kept"} | {"empty_audio": 2}
    assert report["media"]["images"] == 2 and report["media"]["audio"] == 5 + kept_bad
    assert manifest["media"]["train"] == {k: report["per_split"]["train"][k] for k in ("images", "audio", "audio_s")}
    samples = {s["__key__"]: s for s in wds.WebDataset(shard_paths(vdir, "train"), shardshuffle=False)}
    assert set(samples["both"]) >= {"jpg", "flac"} and "jpg" not in samples["s1"] and "flac" not in samples["img"]
    y, rate = sf.read(io.BytesIO(samples["s1"]["flac"]))
    assert rate == 16_000 and y.ndim == 1 and len(y) == 16_000
    assert report["media"]["audio_s"] == pytest.approx(sum(
        len(sf.read(io.BytesIO(s["flac"]))[0]) / 16_000 for s in samples.values() if "flac" in s), abs=1e-3)
    assert all(not shard_paths(vdir, s) for s in SPLITS if s != "train")
    assert validate_version(vdir)["ok"], validate_version(vdir)["problems"]
    assert inspect_version(vdir)["media"] == report["media"]
    rejects = [json.loads(x) for x in (vdir / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["audio"] for r in rejects}["truncated.flac"].endswith("bad/truncated.flac")
    from mmfusion.cli import main

    assert main(["data", "inspect", str(vdir), "--samples", "6"]) == 0  # audio-only examples print too
    out = capsys.readouterr().out
    assert f"with audio {report['media']['audio']}" in out and "1.0 s audio" in out and "112x112, 1.0 s audio" in out
