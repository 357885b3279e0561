"""The model learns to see: a tiny in-process run on synthetic scenes must answer colour questions
far above chance, and its cross-attention for a colour word must fall on that object.

This is the fast guard against a regression in learning (the benchmark `bench/learn.py` measures
the default run against the full targets). One model is trained once for the module, in-process,
with the debug preset's recipe, on freshly generated scenes; held-out scenes come from another seed.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from mmcore.data import SampleConfig, collate, decode_sample, decode_text, encode, pad_ids, train_tokenizer
from mmcore.explain import generate_with_attention, peak_cell
from mmcore.losses import build_loss
from mmcore.model import build_model, model_config
from pipelines.ingest.synth import COLORS, SIZES, make_sample
from pipelines.train.optim import build_optimizer

TRAIN_SCENES, HELD_OUT = 600, 120
STEPS, BATCH = 360, 32


def scenes(seed: int, n: int) -> list[dict]:
    """Shard-like samples (PIL image + json dict) straight from the generator."""
    out = []
    for i in range(n):
        record, image = make_sample(seed, i)
        out.append({"__key__": record["id"], "jpg": image, "json": record})
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    rng = random.Random(0)
    train = scenes(7, TRAIN_SCENES)
    texts = [t for s in train for t in s["json"]["captions"]]
    texts += [x for s in train for q in s["json"]["qa"] for x in (q["question"], *q["answers"])]
    tok = train_tokenizer(texts, 300)
    model = build_model(model_config("debug", vocab_size=len(tok)))
    cfg = SampleConfig(model.cfg.image.image_size, 32, 8, qa_per_sample=5)
    losses = {t: build_loss(t, label_smoothing=0.0) for t in ("caption", "vqa")}
    opt, sched = build_optimizer(model, 2e-3, 0.05, 20, STEPS, 0.1)
    model.train()
    for step in range(STEPS):
        task = ("caption", "vqa")[step % 2]
        batch = collate([decode_sample(s, tok, cfg, train=True, rng=rng) for s in rng.sample(train, BATCH)])
        losses[task](model(batch, task))["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    model.eval()
    return model, tok, cfg


def test_a_tiny_run_answers_colour_questions_far_above_chance(trained) -> None:
    model, tok, cfg = trained
    held = scenes(8, HELD_OUT)
    items = [decode_sample(s, tok, cfg, train=False) for s in held]
    pairs = [(i, q) for i, s in enumerate(held) for q in s["json"]["qa"] if q["question"].startswith("what color")]
    images = torch.stack([items[i]["image"] for i, _ in pairs])
    ids, mask = pad_ids([torch.tensor(encode(tok, q["question"], 32)) for _, q in pairs])
    answers = decode_text(tok, model.generate(images, 4, prompt_ids=ids, prompt_mask=mask))
    accuracy = sum(a.strip() == q["answers"][0] for a, (_, q) in zip(answers, pairs, strict=True)) / len(pairs)
    chance = 1 / len(COLORS)
    assert accuracy >= 0.35, f"colour VQA accuracy {accuracy:.2f} on held-out scenes (chance {chance:.2f})"


def test_attention_for_a_colour_word_falls_on_that_object(trained) -> None:
    """For each colour word of a generated caption that names an object of the scene, the most
    attended patch must lie in that object's box far more often than a random patch would."""
    model, tok, cfg = trained
    colour_ids = {tok.convert_tokens_to_ids(c): c for c in COLORS}
    hits = chance = total = 0
    for sample in scenes(9, HELD_OUT):
        item = decode_sample(sample, tok, cfg, train=False)
        out = generate_with_attention(model, item["image"][None], 24)
        shapes = sample["json"]["meta"]["shapes"]
        for token, amap in zip(out.tokens.tolist(), out.maps, strict=True):
            owners = [s for s in shapes if s["color"] == colour_ids.get(token)]
            if len(owners) != 1:
                continue
            s = owners[0]
            half = SIZES[s["size"]] / 2 + 0.5 / amap.shape[-1]  # the box, widened by half a cell
            x, y = peak_cell(amap)
            hits += abs(x - s["x"]) <= half and abs(y - s["y"]) <= half
            chance += min(1.0, (2 * half) ** 2)
            total += 1
    assert total >= HELD_OUT // 2, f"only {total} colour words named an object of their scene"
    rate, base = hits / total, chance / total
    assert rate >= 2 * base and rate >= 0.5, f"attention peak on the named object {rate:.2f} of the time (chance {base:.2f})"


def test_the_checker_rejects_a_model_that_does_not_look(trained) -> None:
    """The colour check can fail: the same questions answered with every image blanked score low."""
    model, tok, cfg = trained
    held = scenes(8, HELD_OUT)
    pairs = [q for s in held for q in s["json"]["qa"] if q["question"].startswith("what color")]
    ids, mask = pad_ids([torch.tensor(encode(tok, q["question"], 32)) for q in pairs])
    blank = torch.zeros(len(pairs), 3, cfg.image_size, cfg.image_size)
    answers = decode_text(tok, model.generate(blank, 4, prompt_ids=ids, prompt_mask=mask))
    accuracy = sum(a.strip() == q["answers"][0] for a, q in zip(answers, pairs, strict=True)) / len(pairs)
    assert accuracy < 0.4
    assert re.fullmatch(r"[a-z]+", answers[0].strip())
