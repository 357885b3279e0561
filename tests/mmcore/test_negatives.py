"""Several questions per image in one VQA step, and one-word-edited ITM negatives."""

from __future__ import annotations

import json
import random

import torch
from mmcore_support import tiny_config

from mmcore.data import SampleConfig, collate, decode_sample, decode_text
from mmcore.data.negatives import (
    batch_edit_negatives,
    edit_candidates,
    edit_negative,
    likeness,
    swap_negative,
    word_kinds,
)
from mmcore.losses import build_loss
from mmcore.model import build_model


def test_edit_candidates_align_equal_length_replacements():
    a = [2, 10, 11, 12, 20, 21, 3]  # [CLS] small red circle on left [SEP]
    b = [2, 10, 14, 15, 20, 22, 3]  # [CLS] small blue square on right [SEP]
    assert edit_candidates(a, b) == [(2, 2), (3, 3), (5, 5)]
    # An insertion shifts the alignment; only the aligned replacement is offered.
    c = [2, 30, 10, 11, 13, 20, 21, 3]  # [CLS] there small red diamond on left [SEP]
    assert edit_candidates(a, c) == [(3, 4)]
    assert edit_candidates(a, a) == []


def test_edit_negative_changes_one_token_and_never_gives_an_own_caption():
    ids, other = (2, 10, 11, 12, 3), (2, 10, 14, 15, 3)
    seen = set()
    for seed in range(30):
        neg = edit_negative(ids, [other], {ids}, random.Random(seed))
        assert sum(x != y for x, y in zip(neg, ids, strict=True)) == 1
        seen.add(neg)
    assert seen == {(2, 10, 14, 12, 3), (2, 10, 11, 15, 3)}
    # Both edits read like one of the image's own captions: no negative.
    own = {ids, (2, 10, 14, 12, 3), (2, 10, 11, 15, 3)}
    assert edit_negative(ids, [other], own, random.Random(0)) is None
    assert edit_negative(ids, [ids], {ids}, random.Random(0)) is None


def test_batch_edit_negatives_one_per_sample_from_the_others():
    caps = [(2, 10, 11, 3), (2, 10, 12, 3), (2, 13, 11, 3)]
    negs = batch_edit_negatives(caps, [[c] for c in caps], random.Random(0))
    for cap, neg in zip(caps, negs, strict=True):
        assert neg is not None and neg != cap and len(neg) == len(cap)
        assert sum(x != y for x, y in zip(neg, cap, strict=True)) == 1


def test_the_likest_caption_gives_the_edit():
    cap = (2, 10, 11, 12, 20, 21, 3)  # [CLS] small red circle on left [SEP]
    same_form = (2, 10, 11, 12, 20, 22, 3)  # ... on right: the only edit is left -> right
    other_form = (2, 30, 11, 12, 25, 26, 3)  # [CLS] one red circle in middle [SEP]
    assert likeness(cap, same_form) == 6 and likeness(cap, other_form) == 4 and likeness(cap, cap[:-1]) == -1
    for seed in range(10):
        negs = batch_edit_negatives([cap, other_form, same_form], [[cap], [other_form], [same_form]],
                                    random.Random(seed))
        assert negs[0] == same_form  # never "one"/"in"/"middle" from the other form


# [CLS]=2 [SEP]=3 a=5 small=10 large=13 red=11 blue=14 circle=12 square=15 left=20 of=21 there=30 is=31
TWO = (2, 5, 10, 11, 12, 20, 21, 5, 13, 14, 15, 3)  # a small red circle left of a large blue square
TWO_B = (2, 5, 13, 14, 12, 20, 21, 5, 10, 11, 15, 3)  # a large blue circle left of a small red square
OTHER_FORM = (2, 30, 31, 5, 10, 11, 12, 20, 21, 13, 14, 3)  # there is a small red circle left of large blue


def test_word_kinds_join_words_in_one_place_of_one_form_only():
    kinds = word_kinds([TWO, TWO_B], [[TWO_B], [TWO]])
    assert kinds[10] == kinds[13] and kinds[11] == kinds[14]  # size with size, colour with colour
    assert len({kinds[10], kinds[11]}) == 2 and 12 not in kinds  # the circle stayed in place
    # A caption of another form (same length, few places alike) aligns "a" with "there": ignored.
    assert likeness(TWO, OTHER_FORM) * 2 < len(TWO)
    assert word_kinds([TWO, OTHER_FORM], [[OTHER_FORM], [TWO]]) == {}


def test_swap_negative_exchanges_two_words_of_one_kind_and_never_gives_an_own_caption():
    kinds = {10: 0, 13: 0, 11: 1, 14: 1, 12: 2, 15: 2}
    seen = set()
    for seed in range(40):
        neg = swap_negative(TWO, kinds, {TWO}, random.Random(seed))
        changed = [i for i, (x, y) in enumerate(zip(neg, TWO, strict=True)) if x != y]
        assert sorted(neg) == sorted(TWO) and len(changed) == 2  # the same words, two places
        assert kinds[TWO[changed[0]]] == kinds[TWO[changed[1]]]
        seen.add(neg)
    assert len(seen) == 3  # sizes, colours or shapes swapped
    every = seen | {TWO}
    assert swap_negative(TWO, kinds, every, random.Random(0)) is None
    assert swap_negative((2, 5, 10, 11, 12, 3), kinds, set(), random.Random(0)) is None  # one of each kind


def test_batch_swap_negatives_hold_the_captions_words_and_leave_the_edits_as_they_were():
    caps = [TWO, TWO_B, (2, 5, 10, 14, 15, 20, 21, 5, 13, 11, 12, 3)]
    own = [[c] for c in caps]
    plain = batch_edit_negatives(caps, own, random.Random(3))
    assert batch_edit_negatives(caps, own, random.Random(3), swap_share=0.0) == plain  # no share: unchanged
    swapped = batch_edit_negatives(caps, own, random.Random(3), swap_share=1.0)
    for cap, neg in zip(caps, swapped, strict=True):
        assert neg not in own and sorted(neg) == sorted(cap) and neg != cap


def _train_items(samples, tokenizer, cfg, n=4):
    rng = random.Random(0)
    return [decode_sample(s, tokenizer, cfg, train=True, rng=rng) for s in samples[:n]]


def test_several_questions_per_image_are_rows_of_one_batch(samples, tokenizer):
    two = [dict(s, json=json.dumps({**json.loads(s["json"]), "qa": json.loads(s["json"])["qa"] + [
        {"question": "is the circle red?", "answers": ["red"]}]}).encode()) for s in samples[:3]]
    cfg = SampleConfig(image_size=32, max_text_len=16, max_answer_len=6, qa_per_sample=3)
    items = _train_items(two, tokenizer, cfg, 3)
    assert all(len(it["more_qa"]) == 1 for it in items)  # 2 pairs each: one more than the first
    batch = collate(items)
    assert batch["question_image"].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["question_ids"].shape[0] == batch["answer_ids"].shape[0] == batch["has_qa"].shape[0] == 6
    questions = decode_text(tokenizer, [q[1:].tolist() for q in batch["question_ids"]])
    for b in range(3):  # an image's two rows ask its two distinct questions
        asked = {questions[b], questions[b + 3]}
        assert asked == {json.loads(two[b]["json"])["qa"][0]["question"], "is the circle red?"}
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer))
    out = model(batch, "vqa")
    assert out.lm_logits.shape[0] == out.lm_labels.shape[0] == 6
    # Each row is answered from its own image: the first three rows equal a one-question batch.
    single = collate([{k: v for k, v in it.items() if k != "more_qa"} for it in items])
    model.eval()
    with torch.no_grad():
        rows = model(batch, "vqa").lm_logits[:3]
        alone = model(single, "vqa").lm_logits
    t = min(rows.shape[1], alone.shape[1])
    assert torch.allclose(rows[:, :t][single["answer_mask"][:, 1:t + 1] > 0],
                          alone[:, :t][single["answer_mask"][:, 1:t + 1] > 0], atol=1e-5)


def test_edit_negatives_enter_the_itm_loss(samples, tokenizer):
    cfg = SampleConfig(image_size=32, max_text_len=16, max_answer_len=6, caption_variants=True)
    items = _train_items(samples, tokenizer, cfg, 8)
    batch = collate(items)
    assert collate(items)["edit_neg_ids"].tolist() == batch["edit_neg_ids"].tolist()  # reproducible
    n = len(batch["edit_neg_image"])
    assert n >= 6
    own = {b: {tuple(v) for v in items[b]["caption_variants"]} for b in range(8)}
    for row, b in enumerate(batch["edit_neg_image"].tolist()):
        ids = batch["edit_neg_ids"][row][batch["edit_neg_mask"][row] > 0].tolist()
        assert tuple(ids) not in own[b]
        cap = items[b]["caption_ids"].tolist()
        assert len(ids) == len(cap) and sum(x != y for x, y in zip(ids, cap, strict=True)) == 1
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer))
    out = model(batch, "retrieval")
    assert out.itm_logits.shape == out.itm_labels.shape == (3 * 8 + n,)
    assert out.itm_labels[-n:].eq(0).all() and out.itm_labels[:8].eq(1).all()
    loss = build_loss("retrieval")(out)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    # Without variants the batch has no edited negatives and ITM keeps its 3B pairs.
    plain = collate(_train_items(samples, tokenizer, SampleConfig(32, 16, 6), 8))
    assert "edit_neg_ids" not in plain and model(plain, "retrieval").itm_logits.shape == (24,)
