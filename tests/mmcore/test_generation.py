"""Generation: EOS and max length, beam width 1 == greedy, KV-cache decoding == full decoding."""

from __future__ import annotations

import torch
from torch import nn

from mmcore.decoders import DecoderCache, beam_search, greedy_search

torch.set_num_threads(1)
PAD, BOS, EOS, V = 0, 2, 3, 10


class ScriptedDecoder(nn.Module):
    """Emits a fixed token script per batch row (row id = memory[:, 0, 0]); counts its calls."""

    def __init__(self, scripts: list[list[int]]):
        super().__init__()
        self.scripts, self.calls = scripts, 0

    def forward(self, ids, memory, memory_mask=None, cache: DecoderCache | None = None):
        self.calls += 1
        pos = (cache.length if cache is not None else 0) + ids.shape[1] - 1
        if cache is not None:
            cache.length += ids.shape[1]
        logits = torch.full((ids.shape[0], ids.shape[1], V), -10.0)
        for b, row in enumerate(memory[:, 0, 0].long().tolist()):
            script = self.scripts[row]
            logits[b, -1, script[pos] if pos < len(script) else 5] = 10.0
        return logits


def test_greedy_stops_at_eos_and_respects_max_len():
    dec = ScriptedDecoder([[7, 8, EOS], [7, EOS], [6, 6, 6, 6, 6, 6, 6, 6, 6]])
    memory = torch.arange(3).float()[:, None, None].expand(3, 1, 4).contiguous()
    out = greedy_search(dec, memory, None, BOS, EOS, PAD, max_len=5)
    assert out.tolist() == [[7, 8, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD], [6, 6, 6, 6, 6]]
    dec2 = ScriptedDecoder([[7, 8, EOS], [7, EOS]])
    out = greedy_search(dec2, memory[:2], None, BOS, EOS, PAD, max_len=20)
    assert out.tolist() == [[7, 8, EOS], [7, EOS, PAD]] and dec2.calls == 3  # stops once all ended


def test_beam_search_stops_at_eos_and_respects_max_len():
    dec = ScriptedDecoder([[7, 8, EOS], [6, 6, 6, 6, 6, 6]])
    memory = torch.arange(2).float()[:, None, None].expand(2, 1, 4).contiguous()
    out = beam_search(dec, memory, None, BOS, EOS, PAD, max_len=4, num_beams=3)
    assert out.tolist() == [[7, 8, EOS, PAD], [6, 6, 6, 6]]


def test_beam_width_1_equals_greedy(tiny_model, batch):
    torch.manual_seed(0)
    greedy = tiny_model.generate(batch["image"], max_len=12)
    beam1 = tiny_model.generate(batch["image"], max_len=12, num_beams=1)
    assert torch.equal(greedy, beam1)
    # beam_search itself with width 1 (not the greedy shortcut in generate):
    tokens, _ = tiny_model.encode_image(batch["image"])
    c = tiny_model.cfg
    direct = beam_search(tiny_model.decoder, tokens, None, c.bos_id, c.eos_id, c.pad_id, 12, num_beams=1)
    assert torch.equal(direct, greedy)


def test_kv_cache_equals_full_decoding(tiny_model, batch):
    tokens, _ = tiny_model.encode_image(batch["image"])
    ids = batch["caption_ids"]
    dec = tiny_model.decoder
    full = dec(ids, tokens)
    cache, steps = DecoderCache(), []
    for t in range(ids.shape[1]):
        steps.append(dec(ids[:, t: t + 1], tokens, None, cache))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    for beams in (1, 3):
        kw = dict(max_len=10, num_beams=beams, prompt_ids=batch["question_ids"], prompt_mask=batch["question_mask"])
        assert torch.equal(tiny_model.generate(batch["image"], use_cache=True, **kw),
                           tiny_model.generate(batch["image"], use_cache=False, **kw))


def test_generated_tokens_end_with_padding(tiny_model, batch):
    out = tiny_model.generate(batch["image"], max_len=6, num_beams=2)
    assert out.shape[0] == 4 and out.shape[1] <= 6
    eos = tiny_model.cfg.eos_id
    for row in out.tolist():
        if eos in row:
            assert all(t == tiny_model.cfg.pad_id for t in row[row.index(eos) + 1:])


def test_max_len_beyond_the_position_table_is_refused(tiny_model, batch):
    import pytest

    with pytest.raises(ValueError, match="max_len must be in"):
        tiny_model.generate(batch["image"], max_len=tiny_model.cfg.decoder.max_len)


def test_a_question_prefix_reads_the_same_whatever_its_padding(tokenizer, batch):
    """model.question_prefix: the decoder reads `[CLS] question [SEP]` before the answer. Extra
    padding after a question changes neither the training logits nor the generated answer, and
    greedy, cached, uncached and width-1 beam decoding agree."""
    from mmcore_support import tiny_config

    from mmcore.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer, question_prefix=True)).eval()
    padded = dict(batch)
    extra = torch.zeros(batch["question_ids"].shape[0], 3, dtype=torch.long)
    padded["question_ids"] = torch.cat([batch["question_ids"], extra], dim=1)
    padded["question_mask"] = torch.cat([batch["question_mask"], extra], dim=1)
    a, b = model(batch, "vqa"), model(padded, "vqa")
    assert a.lm_logits.shape[:2] == batch["answer_ids"][:, 1:].shape
    assert torch.equal(a.lm_labels, b.lm_labels)
    real = a.lm_labels != -100
    assert real.any() and torch.allclose(a.lm_logits[real], b.lm_logits[real], atol=1e-5)

    images, q, qm = batch["image"], batch["question_ids"], batch["question_mask"]
    greedy = model.generate(images, 6, prompt_ids=q, prompt_mask=qm)
    assert torch.equal(greedy, model.generate(images, 6, prompt_ids=padded["question_ids"],
                                              prompt_mask=padded["question_mask"]))
    assert torch.equal(greedy, model.generate(images, 6, prompt_ids=q, prompt_mask=qm, use_cache=False))
    tokens, _ = model.image_encoder(images)
    memory, memory_mask = model._vqa_memory(tokens, q, qm)
    c = model.cfg
    beam1 = beam_search(model.decoder, memory, memory_mask, c.bos_id, c.eos_id, c.pad_id, 6, num_beams=1,
                        prompt=q, prompt_mask=qm)
    assert torch.equal(beam1, greedy)
    # the prefix is read: another question in front of the same answer changes its logits
    other = torch.where(qm.bool(), (q + 7) % len(tokenizer), q)  # other words, the same padding
    ids, pad_mask = batch["answer_ids"], torch.cat([qm, batch["answer_mask"]], 1)
    with_q = model.decoder(torch.cat([q, ids], 1), memory, memory_mask, pad_mask=pad_mask)
    with_other = model.decoder(torch.cat([other, ids], 1), memory, memory_mask, pad_mask=pad_mask)
    assert not torch.allclose(with_q[:, q.shape[1]:], with_other[:, q.shape[1]:], atol=1e-3)
