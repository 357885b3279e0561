"""`mmfusion transcribe | answer --audio | retrieve --audio` through the real entry point
(`mmfusion.cli.main`) on a checkpoint with an audio encoder saved here, with clips and scenes taken
from the spoken synthetic set; bad audio and a model without audio fail with a message, not a trace."""

from __future__ import annotations

import io

import pytest
import soundfile as sf
import torch

from mmfusion.cli import main
from pipelines.core.audio import read_flac
from pipelines.core.dataset import read_shard, shard_paths


@pytest.fixture(scope="module")
def files(spoken_dataset, tmp_path_factory):
    """Three test scenes as files: `<key>.jpg`, the spoken caption as `<key>.wav` (a 44.1 kHz stereo
    WAV: the CLI must convert it) and the first spoken question as `<key>-q.flac`."""
    import soxr

    out = tmp_path_factory.mktemp("files")
    (out / "clips").mkdir()
    keys = []
    for raw in read_shard(shard_paths(spoken_dataset, "test")[0]):
        key = raw["__key__"]
        (out / f"{key}.jpg").write_bytes(raw["jpg"])
        mono, rate = read_flac(raw["flac"])
        stereo = soxr.resample(mono, rate, 44_100)[:, None].repeat(2, axis=1)
        sf.write(out / "clips" / f"{key}.wav", stereo, 44_100)
        (out / f"{key}-q.flac").write_bytes(raw["q0.flac"])
        keys.append(key)
        if len(keys) == 3:
            return out, keys
    return out, keys


@pytest.fixture(scope="module")
def audio_checkpoint(spoken_dataset, tmp_path_factory):
    from mmcore.checkpoint import save_checkpoint
    from mmcore.data import load_tokenizer, special_token_ids
    from mmcore.model import build_model, model_config

    tok = load_tokenizer(spoken_dataset / "tokenizer")
    torch.manual_seed(0)
    cfg = model_config("debug", audio_encoder="debug", vocab_size=len(tok), image_size=32,
                       **{"audio.num_layers": 1}, **special_token_ids(tok))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", build_model(cfg).eval(), tok)


@pytest.fixture
def opts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    return ["--config", "debug", "--set", f"services.home={tmp_path / 'home'}", "--set", "eval.max_len=6"]


def test_transcribe_answer_and_retrieve_audio(files, audio_checkpoint, opts, capsys):
    folder, keys = files
    clips = [str(folder / "clips" / f"{k}.wav") for k in keys]
    model = ["--model", str(audio_checkpoint)]
    assert main(["transcribe", *opts, *model, *clips]) == 0
    lines = capsys.readouterr().out.strip("\n").split("\n")
    assert [ln.split("\t")[0] for ln in lines] == clips  # one transcript line per file, in order
    assert main(["answer", *opts, *model, str(folder / f"{keys[0]}.jpg"), "--audio",
                 str(folder / f"{keys[0]}-q.flac")]) == 0
    assert len(capsys.readouterr().out.split("\n")) == 2  # one answer line (untrained: maybe empty)
    assert main(["retrieve", *opts, *model, "--audio", str(folder / "clips"), "--text", "a red circle",
                 "--top-k", "2"]) == 0
    ranked = capsys.readouterr().out.strip().splitlines()
    assert len(ranked) == 2 and all(ln.split("\t")[1] in clips for ln in ranked)
    scores = [float(ln.split("\t")[0]) for ln in ranked]
    assert scores == sorted(scores, reverse=True)


def test_retrieve_audio_reranks_by_the_texts_likelihood(files, audio_checkpoint, opts, capsys):
    """`--rerank-k` (default eval.audio_rerank_k) orders the nearest clips by log p(text | clip),
    and prints it: the same number the model gives for each clip alone; `--rerank-k 0` prints the
    cosine similarities instead."""
    from mmcore.checkpoint import load_checkpoint
    from mmcore.data import encode
    from pipelines.serve.audio import load_waveform

    folder, keys = files
    model_args = ["--model", str(audio_checkpoint)]
    text = "a small red circle in the middle"
    model, tok, _ = load_checkpoint(audio_checkpoint)
    ids = torch.tensor([encode(tok, text, 32)])
    expected = {}
    for k in keys:
        clip = str(folder / "clips" / f"{k}.wav")
        tokens, mask, _ = model.encode_audio(load_waveform(clip, 16_000)[None])
        expected[clip] = float(model.transcript_log_likelihood(tokens, mask, ids, torch.ones_like(ids)))
    assert main(["retrieve", *opts, *model_args, "--audio", str(folder / "clips"), "--text", text,
                 "--top-k", "3", "--rerank-k", "3"]) == 0
    ranked = [ln.split("\t") for ln in capsys.readouterr().out.strip().splitlines()]
    assert [path for _, path in ranked] == sorted(expected, key=expected.get, reverse=True)
    assert [float(score) for score, _ in ranked] == pytest.approx([expected[path] for _, path in ranked], abs=1e-3)
    assert main(["retrieve", *opts, *model_args, "--audio", str(folder / "clips"), "--text", text,
                 "--top-k", "3", "--rerank-k", "0"]) == 0
    cosine = [float(ln.split("\t")[0]) for ln in capsys.readouterr().out.strip().splitlines()]
    assert all(-1.0 <= c <= 1.0 for c in cosine) and all(e < -1.0 for e in expected.values())


def test_the_cli_output_is_the_models_own(files, audio_checkpoint, opts, capsys):
    """What `transcribe` prints is the model's greedy transcript of the resampled, mixed-down clip."""
    from mmcore.checkpoint import load_checkpoint
    from mmcore.data import decode_text
    from pipelines.serve.audio import load_waveform

    folder, keys = files
    clip = folder / "clips" / f"{keys[0]}.wav"
    assert main(["transcribe", *opts, "--model", str(audio_checkpoint), str(clip)]) == 0
    printed = capsys.readouterr().out.rstrip("\n").split("\t", 1)[1]
    model, tok, _ = load_checkpoint(audio_checkpoint)
    wave = load_waveform(clip, 16_000)
    assert abs(len(wave) - sf.info(clip).frames * 16_000 / 44_100) <= 2
    assert printed == decode_text(tok, model.transcribe(wave[None], None, 6))[0]


def test_bad_audio_and_a_model_without_audio_fail_with_a_message(files, audio_checkpoint, opts, capsys, tmp_path,
                                                                   make_untrained_checkpoint, spoken_dataset):
    folder, keys = files
    fake = tmp_path / "fake.wav"
    fake.write_bytes(b"RIFF not really a wave file")
    assert main(["transcribe", *opts, "--model", str(audio_checkpoint), str(fake)]) == 2
    err = capsys.readouterr().err
    assert "not_audio" in err and str(fake) in err
    silent = tmp_path / "silent.wav"
    buf = io.BytesIO()
    sf.write(buf, torch.zeros(16_000).numpy(), 16_000, format="WAV")
    silent.write_bytes(buf.getvalue())
    assert main(["answer", *opts, "--model", str(audio_checkpoint), str(folder / f"{keys[0]}.jpg"),
                 "--audio", str(silent)]) == 2
    assert "silent_audio" in capsys.readouterr().err
    assert main(["answer", *opts, "--model", str(audio_checkpoint), str(folder / f"{keys[0]}.jpg")]) == 2
    assert "--audio" in capsys.readouterr().err  # neither a typed nor a spoken question
    plain = make_untrained_checkpoint(spoken_dataset, tmp_path / "plain")
    assert main(["transcribe", *opts, "--model", str(plain), str(folder / "clips" / f"{keys[0]}.wav")]) == 2
    assert "no audio encoder" in capsys.readouterr().err
