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
from pipelines.evaluate.inference import infer_shard, merge, settings_for


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


def test_audio_text_ranks_rerank_the_top_k_by_the_pair_score():
    """The embeddings rank clip 0's text (0) second and text 1's clip (1) third; a pair score that
    prefers the spoken pairs (i, i) lifts both to the top when they are inside the top k, and
    leaves a rank alone when the match is outside it."""
    audio = torch.eye(3)
    text = torch.tensor([[0.5, 0.0, 0.0], [0.9, 0.3, 0.6], [0.0, 0.0, 1.0]])  # sim[clip a, text t] = text[t][a]
    words = ["a red circle", "a blue square", "a green diamond"]
    assert audio_text_ranks(audio, text, words) == ([1, 0, 0], [0, 2, 0])

    def score(clips, texts):
        return (clips == texts).float() - 0.01 * texts.float()

    assert audio_text_ranks(audio, text, words, score, k=3) == ([0, 0, 0], [0, 0, 0])
    assert audio_text_ranks(audio, text, words, score, k=2) == ([0, 0, 0], [0, 2, 0])  # t2a: clip 1 is 3rd
    assert audio_text_ranks(audio, text, words, score, k=0) == ([1, 0, 0], [0, 2, 0])


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


def test_audio_reranking_ranks_every_text_by_the_clips_likelihood(spoken_dataset, audio_checkpoint, tmp_path):
    """With k = all clips, a clip's re-ranked a2t rank is the rank of its transcript by log p(text |
    clip), computed here clip by clip, unpadded, from the clip's waveform: the tokens kept at
    inference, their padding and the index bookkeeping all have to be right for the two to agree."""
    from mmcore.checkpoint import load_checkpoint
    from mmcore.data import pad_ids, pad_waves
    from mmcore.data.sample import waveform
    from pipelines.core.dataset import shard_paths
    from pipelines.evaluate.audio import audio_fields

    cfg = load_config("debug", [f"services.home={tmp_path}", "eval.max_len=8", "eval.audio_rerank_k=1000"])
    settings = settings_for(cfg, audio_checkpoint)
    assert settings.audio_tokens
    merged = merge([infer_shard(str(audio_checkpoint), url, settings) for url in shard_paths(spoken_dataset, "test")])
    model, _, _ = load_checkpoint(audio_checkpoint)
    n = len(merged["keys"])
    assert n >= 4 and all(t is not None for t in merged["audio_tokens"])
    ids, mask = pad_ids([torch.tensor(t) for t in merged["transcript_ids"]], model.cfg.pad_id)
    loglik = torch.zeros(n, n)  # [clip, text]
    for i, key in enumerate(merged["keys"]):
        raw = next(s for url in shard_paths(spoken_dataset, "test") for s in _read_audio(url) if s["__key__"] == key)
        wave, lengths = pad_waves([waveform(raw["flac"])])
        tokens, clip_mask, _ = model.encode_audio(wave, lengths)
        assert torch.allclose(tokens[0, clip_mask[0]], merged["audio_tokens"][i], atol=1e-5)
        loglik[i] = model.transcript_log_likelihood(tokens.expand(n, -1, -1), clip_mask.expand(n, -1), ids, mask)
    fields = audio_fields(merged, lambda qa, answers: [], model, rerank_k=1000, batch_size=5)
    unranked = audio_fields(merged, lambda qa, answers: [], model, rerank_k=0)
    assert [f["a2t_rank"] for f in fields] != [f["a2t_rank"] for f in unranked]  # the re-ranking did something
    same = torch.tensor([[normalise(a) == normalise(b) for b in merged["spoken_captions"]]
                         for a in merged["spoken_captions"]])
    for i in range(n):
        best = loglik[i][same[i]].max()
        assert fields[i]["a2t_rank"] == int((loglik[i][~same[i]] > best).sum()), i
        best_clip = loglik[:, i][same[:, i]].max()
        assert fields[i]["t2a_rank"] == int((loglik[:, i][~same[:, i]] > best_clip).sum()), i


def _read_audio(url):
    from pipelines.core.audio import decode_audio_members
    from pipelines.core.dataset import read_shard

    for raw in read_shard(url):
        yield decode_audio_members(raw, 16_000)
