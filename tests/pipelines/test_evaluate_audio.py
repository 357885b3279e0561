"""Evaluation of a model with an audio encoder on the spoken synthetic set: the audio metrics on
the report card, recomputable from the per-sample file; the word error rate (jiwer) checked
against an edit distance written out here; audio-text ranks with repeated transcripts."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmcore.metrics import bleu4_from_stats
from pipelines.config import load_config
from pipelines.core.records import AUDIO_METRICS, compute_metrics, read_records
from pipelines.evaluate import evaluate
from pipelines.evaluate.audio import audio_text_ranks, normalise, wer_counts


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitution, deletion, insertion each cost 1)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def test_wer_counts_agree_with_an_edit_distance():
    assert wer_counts("a red circle on the left", "a red square on the left .") == (1, 6)
    assert wer_counts("A Red circle.", "a red circle") == (0, 3)  # case and punctuation do not count
    assert wer_counts("a b c", "") == (3, 3) and wer_counts("a b c", "x a b c y") == (2, 3)
    rng = random.Random(0)
    words = "a red blue circle square left right on the".split()
    for _ in range(300):
        ref = [rng.choice(words) for _ in range(rng.randint(1, 9))]
        hyp = [rng.choice(words) for _ in range(rng.randint(0, 11))]
        assert wer_counts(" ".join(ref), " ".join(hyp)) == (edit_distance(ref, hyp), len(ref))


def test_audio_text_ranks_count_any_equal_transcript_as_a_hit():
    audio = torch.eye(3)  # clip a's similarity to text t is text[t][a]
    text = torch.tensor([[0.1, 0.0, 0.5], [0.0, 1.0, 0.8], [0.9, 0.0, 0.2]])
    # Clips 0 and 2 say the same: clip 0's nearest text (2) is a hit; clip 2 prefers text 1 (a miss)
    # over its best equal text (0): rank 1.
    a2t, t2a = audio_text_ranks(audio, text, ["a red circle", "a blue square", "A red circle."])
    assert (a2t, t2a) == ([0, 0, 1], [0, 0, 0])
    a2t, t2a = audio_text_ranks(audio, text, ["a red circle", "a blue square", "a green diamond"])
    assert (a2t, t2a) == ([1, 0, 2], [1, 0, 1])


@pytest.fixture(scope="module")
def audio_checkpoint(spoken_dataset, tmp_path_factory):
    """An untrained debug model (32 px, a small audio encoder) with the version's tokenizer."""
    from mmcore.checkpoint import save_checkpoint
    from mmcore.data import load_tokenizer, special_token_ids
    from mmcore.model import build_model, model_config

    torch.set_num_threads(1)
    tok = load_tokenizer(spoken_dataset / "tokenizer")
    torch.manual_seed(0)
    cfg = model_config("debug", audio_encoder="debug", vocab_size=len(tok), image_size=32,
                       **{"audio.num_layers": 1}, **special_token_ids(tok))
    return save_checkpoint(tmp_path_factory.mktemp("audio-ckpt") / "model", build_model(cfg).eval(), tok)


def test_report_card_holds_the_audio_metrics(spoken_dataset, audio_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.max_len=12", "eval.parallel=local"])
    card = evaluate(cfg, audio_checkpoint, spoken_dataset, tmp_path / "eval")
    records = read_records(card["per_sample_path"])
    assert compute_metrics(records) == card["metrics"]
    assert all(card["metrics"][m] is not None for m in AUDIO_METRICS)
    assert card["num_audio"] == card["num_images"] == len(records) > 0
    assert card["num_spoken_questions"] == card["num_questions"] > 0  # every question was asked by voice
    errors = words = 0
    for r in records:
        asr = r["asr"]
        assert asr["reference"] == r["references"][0]  # the spoken caption is the primary one
        ref, hyp = normalise(asr["reference"]).split(), normalise(asr["hypothesis"]).split()
        assert (asr["errors"], asr["words"]) == (edit_distance(ref, hyp), len(ref))
        errors, words = errors + asr["errors"], words + asr["words"]
        assert [q["question"] for q in r["spoken_vqa"]] == [q["question"] for q in r["vqa"]]
        assert 0 <= r["a2t_rank"] < len(records) and 0 <= r["t2a_rank"] < len(records)
        assert isinstance(r["audio_caption"]["generated"], str) and len(r["audio_caption"]["bleu_stats"]) == 10
    assert card["metrics"]["asr_wer"] == pytest.approx(errors / words)
    stats = np.array([r["audio_caption"]["bleu_stats"] for r in records])
    assert stats[:, 0].sum() > 0  # some words were written
    assert card["metrics"]["audio_caption_bleu4"] == pytest.approx(bleu4_from_stats(stats))
    assert card["metrics"]["a2t_r10"] == pytest.approx(sum(r["a2t_rank"] < 10 for r in records) / len(records))
    assert card["metrics"]["asr_wer"] > 0.5  # untrained: it cannot transcribe


def test_an_image_text_model_has_no_audio_metrics(spoken_dataset, tmp_path, make_untrained_checkpoint, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.max_len=8", "eval.parallel=local"])
    card = evaluate(cfg, make_untrained_checkpoint(spoken_dataset, tmp_path / "ckpt"), spoken_dataset, tmp_path / "e")
    assert all(card["metrics"][m] is None for m in AUDIO_METRICS)
    assert card["metrics"]["vqa_acc"] is not None
    assert all("asr" not in r and "audio_caption" not in r for r in read_records(card["per_sample_path"]))
