"""Audio in the fusion model: the three fusions over any set of modalities (a missing one masked),
an image-text model left as it was, the audio tasks' forward, losses and gradients, and generation.

The "speech" here is tone words: each word of a caption is a short tone at a pitch of its own, so a
model must hear the pitches to transcribe it (the captions share their template words)."""

from __future__ import annotations

import math

import pytest
import torch
from mmcore_support import tiny_config

from mmcore.data import collate, decode_sample, decode_text
from mmcore.fusion import FusionConfig, build_fusion, join_modalities
from mmcore.losses import build_loss
from mmcore.model import AUDIO_TASKS, FusionModelConfig, build_model

SR = 16_000
AUDIO = {"audio_encoder": "debug", "audio.n_mels": 24, "audio.hidden_dim": 32, "audio.mlp_dim": 64,
         "audio.num_layers": 1}


def tone_words(text: str, vocab: list[str], seconds: float = 0.12) -> torch.Tensor:
    """`(T,)` one tone per word, its pitch set by the word's index in `vocab`, with short gaps."""
    t = torch.arange(int(seconds * SR)) / SR
    gap = torch.zeros(int(0.03 * SR))
    parts = []
    for word in text.split():
        freq = 300.0 + 150.0 * vocab.index(word)
        parts += [0.5 * torch.sin(2 * math.pi * freq * t), gap]
    return torch.cat(parts)


def spoken(samples, vocab) -> list[dict]:
    """The samples with `flac` (the primary caption as tone words) and a spoken question `q0.flac`
    already decoded to waveforms, as the pipelines hand them to `decode_sample`."""
    import json

    out = []
    for s in samples:
        meta = json.loads(s["json"])
        meta["qa"][0]["audio"] = "q0.flac"
        out.append({**s, "json": json.dumps(meta).encode(), "flac": tone_words(s["txt"].decode(), vocab),
                    "q0.flac": tone_words(meta["qa"][0]["question"].replace("?", ""), vocab)})
    return out


@pytest.fixture(scope="module")
def vocab(samples):
    import json

    words = {w for s in samples for w in s["txt"].decode().split()}
    words |= {w for s in samples for w in json.loads(s["json"])["qa"][0]["question"].replace("?", "").split()}
    return sorted(words)


@pytest.fixture()
def audio_batch(samples, vocab, tokenizer, sample_cfg):
    cfg = type(sample_cfg)(**{**sample_cfg.__dict__, "audio": True})
    return collate([decode_sample(s, tokenizer, cfg, train=False) for s in spoken(samples[:4], vocab)])


def _audio_model(tokenizer, **overrides):
    torch.manual_seed(0)
    return build_model(tiny_config(tokenizer, **AUDIO, **overrides))


@pytest.mark.parametrize("kind", ["cross_attention", "gated", "concat"])
def test_a_missing_modality_is_masked_not_attended(kind):
    """Image + audio joined as the context: with a sample's audio masked out, its fusion equals the
    image-only fusion exactly; with part of the audio masked, the masked part's values never matter."""
    torch.manual_seed(0)
    fusion = build_fusion(FusionConfig(kind, num_layers=2, num_heads=4), 16).eval()
    text, text_mask = torch.randn(2, 5, 16), torch.ones(2, 5)
    image, audio = torch.randn(2, 7, 16), torch.randn(2, 9, 16)
    none = torch.zeros(2, 9, dtype=torch.bool)
    context, mask = join_modalities([(image, None), (audio, none)])
    assert context.shape == (2, 16, 16) and mask.sum().item() == 14
    assert torch.allclose(fusion(text, text_mask, context, mask), fusion(text, text_mask, image), atol=1e-5)
    part = torch.arange(9)[None].expand(2, 9) < torch.tensor([[4], [9]])
    context, mask = join_modalities([(image, None), (audio, part)])
    noisy = context.clone()
    noisy[:, 7:][~part] = 1e3  # what a masked token holds must not matter
    assert torch.allclose(fusion(text, text_mask, context, mask), fusion(text, text_mask, noisy, mask), atol=1e-5)
    with_audio = fusion(text, text_mask, context, mask)
    assert not torch.allclose(with_audio, fusion(text, text_mask, image), atol=1e-3)  # audio is heard


def test_image_text_model_is_unchanged_without_audio(tokenizer):
    """No `audio` config: no audio parameters, the config round-trips through a checkpoint's dict
    that has no `audio` key (older checkpoints), and audio tasks say what is missing."""
    cfg = tiny_config(tokenizer)
    assert cfg.audio is None
    model = build_model(cfg)
    assert not [k for k in model.state_dict() if "audio" in k]
    old = {k: v for k, v in cfg.to_dict().items() if k != "audio"}
    assert FusionModelConfig.from_dict(old) == cfg
    with_audio = tiny_config(tokenizer, **AUDIO)
    assert FusionModelConfig.from_dict(with_audio.to_dict()) == with_audio
    assert with_audio.audio.n_mels == 24 and with_audio.audio.num_layers == 1
    image_text_keys = set(model.state_dict())
    assert image_text_keys < set(build_model(with_audio).state_dict())
    with pytest.raises(ValueError, match="no audio encoder"):
        model({"image": torch.zeros(1, 3, 32, 32)}, "asr")


@pytest.mark.parametrize("task", AUDIO_TASKS)
def test_audio_tasks_forward_loss_and_gradients(tokenizer, audio_batch, task):
    model = _audio_model(tokenizer)
    out = model(audio_batch, task)
    losses = build_loss(task)(out)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("audio_encoder.transformer")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    if task == "audio_retrieval":
        assert out.audio_emb.shape == out.text_emb.shape == (4, 16)


def test_samples_without_audio_contribute_nothing(tokenizer, audio_batch):
    model = _audio_model(tokenizer).eval()
    batch = dict(audio_batch)
    batch["has_audio"] = torch.tensor([True, False, True, True])
    batch["has_question_audio"] = torch.tensor([True, True, False, True])
    assert (model(batch, "asr").lm_labels[1] == -100).all()
    assert (model(batch, "spoken_vqa").lm_labels[2] == -100).all()
    assert (model(batch, "audio_caption").lm_labels[1] == -100).all()
    assert (model(batch, "audio_caption").lm_labels[0] != -100).any()
    out = model(batch, "audio_retrieval")
    assert out.audio_emb.shape[0] == out.text_emb.shape[0] == 3


def test_padding_the_audio_changes_nothing(tokenizer, audio_batch):
    """A batch padded to a longer clip gives the same transcript logits (the audio mask reaches the
    decoder's cross-attention)."""
    model = _audio_model(tokenizer).eval()
    longer = dict(audio_batch)
    longer["audio"] = torch.nn.functional.pad(audio_batch["audio"], (0, 4000), value=0.3)
    a = model(audio_batch, "asr").lm_logits
    b = model(longer, "asr").lm_logits
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("prompt", [False, True])
def test_asr_and_spoken_vqa_overfit_tone_words(tokenizer, samples, vocab, sample_cfg, prompt):
    """8 clips of tone words: after a short training the model transcribes every one exactly and
    answers every spoken question (greedy decoding), which an untrained model does not; with the
    spoken-answer task prompt too (trained and decoded behind it)."""
    cfg = type(sample_cfg)(**{**sample_cfg.__dict__, "audio": True})
    batch = collate([decode_sample(s, tokenizer, cfg, train=False) for s in spoken(samples[:8], vocab)])
    model = _audio_model(tokenizer, spoken_answer_prompt=prompt)
    refs = [s["txt"].decode() for s in samples[:8]]
    answers = [a[0]["answers"][0] for a in batch["qa"]]

    def scores():
        model.eval()
        said = decode_text(tokenizer, model.transcribe(batch["audio"], batch["audio_lengths"], max_len=10))
        told = decode_text(tokenizer, model.answer_spoken(batch["image"], batch["question_audio"],
                                                          batch["question_audio_lengths"], max_len=4))
        model.train()
        return sum(s == r for s, r in zip(said, refs, strict=True)), sum(a == r for a, r in zip(told, answers, strict=True))

    assert scores() == (0, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = {t: build_loss(t, label_smoothing=0.0) for t in ("asr", "spoken_vqa")}
    for step in range(200):
        task = ("asr", "spoken_vqa")[step % 2]
        loss = losses[task](model(batch, task))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert scores() == (8, 8)


def test_the_spoken_answer_prompt_is_read_but_not_scored(tokenizer, audio_batch):
    """With `spoken_answer_prompt` the decoder reads `[CLS] [SEP]` before the answer: the same
    weights give other answer logits, over the answer's tokens only (same labels)."""
    plain = _audio_model(tokenizer).eval()
    prompted = _audio_model(tokenizer, spoken_answer_prompt=True).eval()
    prompted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(audio_batch, "spoken_vqa"), prompted(audio_batch, "spoken_vqa")
    assert a.lm_logits.shape == b.lm_logits.shape and torch.equal(a.lm_labels, b.lm_labels)
    assert not torch.allclose(a.lm_logits, b.lm_logits, atol=1e-4)


def test_audio_caption_reads_the_spoken_description(tokenizer, samples, vocab, sample_cfg):
    """Audio-conditioned captioning with every image blanked: only the clip can tell the 8 captions
    apart, so writing each one exactly means the caption follows what was said."""
    cfg = type(sample_cfg)(**{**sample_cfg.__dict__, "audio": True})
    batch = collate([decode_sample(s, tokenizer, cfg, train=False) for s in spoken(samples[:8], vocab)])
    batch["image"] = torch.zeros_like(batch["image"])
    model = _audio_model(tokenizer)
    refs = [s["txt"].decode() for s in samples[:8]]
    assert len(set(refs)) == 8

    def written() -> int:
        model.eval()
        out = decode_text(tokenizer, model.caption_with_audio(batch["image"], batch["audio"],
                                                              batch["audio_lengths"], max_len=10))
        model.train()
        return sum(w == r for w, r in zip(out, refs, strict=True))

    assert written() == 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = build_loss("audio_caption", label_smoothing=0.0)
    for _ in range(150):
        loss = loss_fn(model(batch, "audio_caption"))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert written() == 8


def test_ctc_targets_drop_bos_eos_and_padding():
    from mmcore.model import _ctc_targets

    ids = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 5, 3, 0, 0, 0]])
    targets, lengths = _ctc_targets(ids, (ids != 0).long(), bos_id=2, eos_id=3)
    assert lengths.tolist() == [3, 1]
    assert targets[0, :3].tolist() == [7, 8, 9] and targets[1, :1].tolist() == [5]
    assert (targets[1, 1:] == 0).all()


def test_asr_with_a_ctc_head_adds_the_ctc_loss(tokenizer, audio_batch):
    """`asr_ctc`: a CTC head on the audio tokens (vocabulary + blank) beside the decoder; its loss is
    weighted into asr's, samples without audio left out, and it trains the audio encoder."""
    model = _audio_model(tokenizer, asr_ctc=True)
    assert model.ctc_head.out_features == model.cfg.vocab_size + 1
    batch = dict(audio_batch)
    batch["has_audio"] = torch.tensor([True, False, True, True])
    out = model(batch, "asr")
    assert out.ctc_log_probs.shape[1] == out.ctc_targets.shape[0] == 3
    assert (out.ctc_input_lengths >= out.ctc_target_lengths).all() and (out.ctc_target_lengths > 0).all()
    parts = build_loss("asr", ctc_weight=0.5)(out)
    assert torch.isfinite(parts["ctc"]) and parts["ctc"] > 0
    assert torch.allclose(parts["loss"], parts["lm"] + 0.5 * parts["ctc"])
    parts["loss"].backward()
    assert model.ctc_head.weight.grad.abs().sum() > 0
    assert model.audio_encoder.conv1.weight.grad.abs().sum() > 0
    # without the flag: no head, no CTC term, the same state-dict keys as before
    plain = _audio_model(tokenizer)
    assert not hasattr(plain, "ctc_head") and "ctc" not in build_loss("asr")(plain(batch, "asr"))


def test_transcript_log_likelihood_is_the_asr_cross_entropy_and_ignores_padding(audio_batch, tokenizer):
    """log p(text | clip) is minus the ASR task's summed token cross-entropy (no smoothing), and
    masked audio tokens appended to the memory do not change it."""
    model = _audio_model(tokenizer).eval()
    b = audio_batch
    with torch.no_grad():
        out = model(b, "asr")
        ce = torch.nn.functional.cross_entropy(out.lm_logits.transpose(1, 2), out.lm_labels, reduction="none")
        tokens, mask, _ = model.encode_audio(b["audio"], b["audio_lengths"])
    ll = model.transcript_log_likelihood(tokens, mask, b["transcript_ids"], b["transcript_mask"])
    assert ll.shape == (len(tokens),) and torch.allclose(ll, -ce.sum(dim=1), atol=1e-4)
    padded = torch.cat([tokens, torch.randn(len(tokens), 5, tokens.shape[2])], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(len(mask), 5, dtype=torch.bool)], dim=1)
    assert torch.allclose(model.transcript_log_likelihood(padded, padded_mask, b["transcript_ids"],
                                                          b["transcript_mask"]), ll, atol=1e-4)
