"""Attention maps of generation: the same tokens as generate, maps on the patch grid summing to 1."""

from __future__ import annotations

import torch

from mmcore.explain import generate_with_attention, patch_range, peak_cell
from mmcore.model import build_model, model_config
from mmcore.modules import Attention, attention_mask, record_attention


def test_recorded_attention_equals_the_fused_kernel() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = attention_mask(torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    plain, _ = attn(x, context=ctx, mask=mask)
    with record_attention({"a": attn}) as rec:
        kept, _ = attn(x, context=ctx, mask=mask)
    assert torch.allclose(plain, kept, atol=1e-6)
    (weights,) = rec["a"]
    assert weights.shape == (2, 4, 5, 7)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 5))
    assert weights[1, ..., 4:].abs().max() == 0  # padding keys get nothing
    assert attn.record is None  # recording stops with the context


def test_generate_with_attention_matches_generate() -> None:
    torch.manual_seed(0)
    model = build_model(model_config("debug", vocab_size=50, image_size=64)).eval()
    assert model.cfg.question_prefix  # answers are explained with the question read first
    image = torch.randn(1, 3, 64, 64)
    start, side = patch_range(model, model.image_encoder(image)[0].shape[1])
    assert (start, side) == (1, 4)  # ViT: class token first, a 4x4 grid of 16 px patches
    out = generate_with_attention(model, image, 6)
    expected = model.generate(image, 6)[0]
    assert torch.equal(out.tokens, expected[: len(out.tokens)])
    assert out.maps.shape == (len(out.tokens), side, side)
    assert torch.allclose(out.maps.sum((1, 2)), torch.ones(len(out.tokens)), atol=1e-5)
    assert ((out.image_share > 0) & (out.image_share <= 1)).all()  # the class token takes the rest
    question = torch.tensor([[2, 7, 8, 9, 3]])
    answered = generate_with_attention(model, image, 4, question)
    expected = model.generate(image, 4, prompt_ids=question, prompt_mask=torch.ones_like(question))[0]
    assert torch.equal(answered.tokens, expected[: len(answered.tokens)])
    # The question tokens take part of the attention too.
    assert answered.image_share.mean() < out.image_share.mean()


def test_peak_cell_is_the_centre_of_the_hottest_cell() -> None:
    amap = torch.zeros(4, 4)
    amap[1, 3] = 1.0  # row 1, column 3
    assert peak_cell(amap) == (0.875, 0.375)
