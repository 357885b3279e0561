"""FusionModel: shapes, masks, fusion kinds, image encoders, determinism, overfitting a batch."""

from __future__ import annotations

import pytest
import torch
from mmcore_support import tiny_config

from mmcore.data import pad_ids
from mmcore.losses import MatchingLoss, PretrainLoss, RetrievalLoss
from mmcore.model import FusionModelConfig, build_model, model_config

torch.set_num_threads(1)


def test_forward_shapes(tiny_model, batch):
    b, t = batch["caption_ids"].shape
    v, e = tiny_model.cfg.vocab_size, tiny_model.cfg.embed_dim
    out = tiny_model(batch, task="pretrain")
    assert out.image_emb.shape == (b, e) and out.text_emb.shape == (b, e)
    assert out.itm_logits.shape == (3 * b,) and out.itm_labels.tolist() == [1.0] * b + [0.0] * 2 * b
    assert out.lm_logits.shape == (b, t - 1, v) and out.lm_labels.shape == (b, t - 1)
    assert tiny_model(batch, task="caption").image_emb is None
    ret = tiny_model(batch, task="retrieval")
    assert ret.lm_logits is None and ret.itm_logits.shape == (3 * b,)
    vqa = tiny_model(batch, task="vqa")
    assert vqa.lm_logits.shape == (b, batch["answer_ids"].shape[1] - 1, v)
    with pytest.raises(ValueError, match="unknown task"):
        tiny_model(batch, task="nope")


def test_word_region_embeddings_are_per_patch_and_per_word(tokenizer, batch):
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer))  # debug-based: token_embed on, a ViT (class token first)
    out = model(batch, task="pretrain")
    b, t = batch["caption_ids"].shape
    patches = (32 // 8) ** 2
    assert out.patch_emb.shape == (b, patches, model.cfg.embed_dim) and out.word_emb.shape == (b, t, model.cfg.embed_dim)
    assert torch.allclose(out.patch_emb.norm(dim=-1), torch.ones(b, patches))
    ids, mask = batch["caption_ids"], batch["caption_mask"].bool()
    words = mask & (ids != model.cfg.bos_id) & (ids != model.cfg.eos_id)
    assert torch.equal(out.word_mask, words) and (words.sum(1) == mask.sum(1) - 2).all()
    parts = PretrainLoss()(out)
    assert set(parts) == {"loss", "itc", "itm", "lm", "token_itc"} and parts["token_itc"] > 0
    parts["loss"].backward()
    assert model.heads.patch_proj.weight.grad.abs().sum() > 0 and model.heads.token_logit_scale.grad is not None
    plain = build_model(tiny_config(tokenizer, token_embed=False))
    out = plain(batch, task="retrieval")
    assert out.patch_emb is None and not hasattr(plain.heads, "patch_proj")
    assert set(PretrainLoss()(plain(batch, task="pretrain"))) == {"loss", "itc", "itm", "lm"}


def _repad(ids: torch.Tensor, mask: torch.Tensor, extra: int):
    rows = [r[m.bool()] for r, m in zip(ids, mask, strict=True)]
    longer, longer_mask = pad_ids(rows + [torch.zeros(ids.shape[1] + extra, dtype=torch.long)])
    return longer[:-1], longer_mask[:-1]


@pytest.mark.parametrize("fusion", ["cross_attention", "gated", "concat"])
def test_padding_does_not_change_outputs(tokenizer, batch, fusion):
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer, fusion=fusion)).eval()
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    ids2, mask2 = _repad(ids, mask, 5)
    assert ids2.shape[1] == ids.shape[1] + 5
    tokens, emb = model.encode_image(batch["image"])
    atol = 1e-5
    assert torch.allclose(model.encode_text(ids, mask)[1], model.encode_text(ids2, mask2)[1], atol=atol)
    assert torch.allclose(model.itm_logits(tokens, ids, mask), model.itm_logits(tokens, ids2, mask2), atol=atol)
    cap = model({**batch, "caption_ids": ids2, "caption_mask": mask2}, task="caption")
    ref = model(batch, task="caption")
    valid = ref.lm_labels != -100
    assert torch.allclose(cap.lm_logits[:, : ids.shape[1] - 1][valid], ref.lm_logits[valid], atol=atol)
    q2, qm2 = _repad(batch["question_ids"], batch["question_mask"], 4)
    vqa2 = model({**batch, "question_ids": q2, "question_mask": qm2}, task="vqa")
    assert torch.allclose(vqa2.lm_logits, model(batch, task="vqa").lm_logits, atol=atol)


def test_token_pooled_itm_reads_every_token_and_ignores_padding(tokenizer, batch):
    """itm_pool="tokens": the logit is a softmax-weighted mean of per-token logits over the real
    tokens; changing one real token's fused state moves it, changing padding does not."""
    from mmcore.heads import FusionHeads

    torch.manual_seed(0)
    heads = FusionHeads(16, 8, itm_pool="tokens")
    fused = torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    logit = heads.match(fused, mask)
    per_token = heads.itm(fused).squeeze(-1)
    weights = heads.itm_weight(fused).squeeze(-1).masked_fill(mask == 0, float("-inf")).softmax(-1)
    assert torch.allclose(logit, (weights * per_token).sum(-1))
    padded = fused.clone()
    padded[0, 4:] = 100.0
    assert torch.allclose(heads.match(padded, mask)[0], logit[0])
    moved = fused.clone()
    moved[0, 2] = torch.randn(16) * 3.0  # a word, not [CLS]
    assert not torch.allclose(heads.match(moved, mask)[0], logit[0])
    cls_heads = FusionHeads(16, 8)
    assert not hasattr(cls_heads, "itm_weight")  # a "cls" model's state dict is what it was
    assert torch.allclose(cls_heads.match(moved, mask)[0], cls_heads.match(fused, mask)[0])  # [CLS] only
    with pytest.raises(ValueError, match="itm_pool must be"):
        FusionHeads(16, 8, itm_pool="mean")
    model = build_model(tiny_config(tokenizer, itm_pool="tokens"))
    assert model.heads.itm_pool == "tokens" and model(batch, task="pretrain").itm_logits.shape == (3 * len(batch["image"]),)


def test_itm_layers_reads_only_the_first_fusion_layers(tokenizer, batch):
    """itm_layers=1 on a two-layer fusion: ITM's logits do not depend on the second layer (VQA's
    memory does), and they equal the head on layer 1 followed by the fusion's final LayerNorm."""
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer, itm_pool="tokens", itm_layers=1, **{"fusion.num_layers": 2})).eval()
    tokens, _ = model.encode_image(batch["image"])
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    text, _ = model.encode_text(ids, mask)
    one_layer = model.fusion(text, mask, tokens, depth=1)
    logits = model.itm_logits(tokens, ids, mask)
    assert torch.allclose(logits, model.heads.match(one_layer, mask))
    memory = model._vqa_memory(tokens, batch["question_ids"], batch["question_mask"])[0]
    with torch.no_grad():
        for p in model.fusion.layers[1].parameters():
            p.add_(torch.randn_like(p))
    assert torch.allclose(model.itm_logits(tokens, ids, mask), logits)
    assert not torch.allclose(model._vqa_memory(tokens, batch["question_ids"], batch["question_mask"])[0], memory)
    assert model(batch, task="retrieval").itm_logits.shape == (3 * len(ids),)
    for bad in ({"itm_layers": 3, "fusion.num_layers": 2}, {"itm_layers": 1, "fusion": "gated"}):
        with pytest.raises(ValueError, match="itm_layers"):
            build_model(tiny_config(tokenizer, **bad))


def test_itm_detach_image_keeps_itm_loss_off_the_image_encoder(tokenizer, batch):
    """itm_detach_image: ITM's logits carry no gradient to the images (nor the encoder), but
    still train the fusion; without it the same logits reach the images."""
    torch.manual_seed(0)
    detached = build_model(tiny_config(tokenizer, itm_detach_image=True))
    images = batch["image"].clone().requires_grad_(True)
    detached({**batch, "image": images}, task="retrieval").itm_logits.sum().backward()
    assert images.grad is None or images.grad.abs().sum() == 0
    assert next(detached.fusion.layers[0].cross_attn.parameters()).grad is not None
    attached = build_model(tiny_config(tokenizer))
    images = batch["image"].clone().requires_grad_(True)
    attached({**batch, "image": images}, task="retrieval").itm_logits.sum().backward()
    assert images.grad.abs().sum() > 0


def test_itm_lm_adds_the_caption_decoders_evidence(tokenizer, batch):
    """itm_lm: ITM's logit is the head's plus learned weights of the decoder's (mean, lowest)
    teacher-forced token log-probability; the evidence matches a hand computation, carries no
    gradient to the decoder, and the weights train through the ITM logits."""
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer, itm_lm=True)).eval()
    tokens, _ = model.encode_image(batch["image"])
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    evidence = model.caption_evidence(ids, mask, tokens)
    logp = model.decoder(ids[:, :-1], tokens, None).log_softmax(-1)
    for i in range(len(ids)):
        n = int(mask[i].sum())  # BOS .. EOS: n - 1 predicted tokens
        token_logp = logp[i, torch.arange(n - 1), ids[i, 1:n]]
        assert torch.allclose(evidence[i], torch.stack([token_logp.mean(), token_logp.min()]), atol=1e-5)
    text, _ = model.encode_text(ids, mask)
    head = model.heads.match(model.fusion(text, mask, tokens), mask)
    assert torch.allclose(model.itm_logits(tokens, ids, mask), head + evidence.sum(-1), atol=1e-5)  # weights start at 1
    # Training: the sum holds the head's logits detached, so its loss trains only the evidence's
    # weights; the head learns from its own logits as it would without itm_lm.
    model.train()
    out = model(batch, task="retrieval")
    assert out.itm_head_logits.shape == out.itm_logits.shape == (3 * len(ids),)
    out.itm_logits.sum().backward(retain_graph=True)
    assert model.heads.itm_lm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.heads.itm.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())  # retrieval trains no decoder; ITM must not either
    out.itm_head_logits.sum().backward()
    assert all(p.grad is not None for p in model.heads.itm.parameters())
    parts = RetrievalLoss().parts(out)
    both = MatchingLoss()(out.itm_logits, out.itm_labels) + MatchingLoss()(out.itm_head_logits, out.itm_labels)
    assert torch.allclose(parts["itm"], both)
    # Adding it draws no random numbers: every other weight initialises as without it.
    torch.manual_seed(0)
    plain = build_model(tiny_config(tokenizer)).state_dict()
    torch.manual_seed(0)
    with_lm = build_model(tiny_config(tokenizer, itm_lm=True)).state_dict()
    assert set(with_lm) - set(plain) == {"heads.itm_lm.weight", "heads.itm_lm.bias"}
    assert all(torch.equal(plain[k], with_lm[k]) for k in plain)


def test_itm_calibration_scores_with_its_fitted_weights_outside_training(tokenizer, batch):
    """itm_calibration: ITM's score is `features @ w + b` over (head logit, decoder mean, lowest
    log-prob), with the weights in a buffer that starts as the head alone; training's ITM logits
    stay the head's, and the buffer draws no random numbers."""
    torch.manual_seed(0)
    plain = build_model(tiny_config(tokenizer)).eval()
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer, itm_calibration=True)).eval()
    tokens, _ = model.encode_image(batch["image"])
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    head = plain.itm_logits(tokens, ids, mask)
    assert torch.equal(model.itm_logits(tokens, ids, mask), head)  # identity until fitted
    features = model.itm_features(tokens, ids, mask)
    assert torch.equal(features[:, 0], head)
    assert torch.equal(features[:, 1:], model.caption_evidence(ids, mask, tokens))
    model.heads.itm_calibration.copy_(torch.tensor([0.5, 2.0, -1.0, 0.25]))
    expected = 0.5 * head + 2.0 * features[:, 1] - features[:, 2] + 0.25
    assert torch.allclose(model.itm_logits(tokens, ids, mask), expected, atol=1e-5)
    assert torch.equal(model.itm_features(tokens, ids, mask), features)  # features never calibrated
    model.train()
    torch.manual_seed(1)
    calibrated_out = model(batch, task="retrieval")
    plain.train()
    torch.manual_seed(1)
    assert torch.equal(calibrated_out.itm_logits, plain(batch, task="retrieval").itm_logits)
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra == {"heads.itm_calibration"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())


def test_resnet_image_encoder(tokenizer, batch):
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer, image_encoder="resnet18", image_size=64))
    images = torch.nn.functional.interpolate(batch["image"], size=64)
    tokens, emb = model.encode_image(images)
    assert tokens.shape == (4, 4, model.cfg.dim) and emb.shape == (4, model.cfg.embed_dim)
    model(dict(batch, image=images), task="pretrain")


def test_same_seed_same_output(tokenizer, batch):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(tiny_config(tokenizer))
        out = model(batch, task="pretrain")  # ITM negatives are sampled: also seeded
        outs.append(PretrainLoss()(out)["loss"])
    assert torch.equal(outs[0], outs[1])


def test_config_overrides_and_round_trip():
    cfg = model_config("debug", vocab_size=77, fusion="gated", **{"decoder.num_layers": 3})
    assert (cfg.text.vocab_size, cfg.fusion.kind, cfg.decoder.num_layers) == (77, "gated", 3)
    assert FusionModelConfig.from_dict(cfg.to_dict()) == cfg
    # A nested dict (`--set model.overrides.image.patch_size=32`) sets one field, not the whole part.
    nested = model_config("debug", image={"patch_size": 32}, **{"fusion": {"num_layers": 2}})
    assert (nested.image.patch_size, nested.image.stem, nested.fusion.num_layers) == (32, "conv", 2)
    with pytest.raises(ValueError, match="unknown model override 'image.bogus'"):
        model_config("debug", image={"bogus": 1})
    with pytest.raises(ValueError, match="unknown model override"):
        model_config("debug", decoder_layers=3)
    with pytest.raises(ValueError, match="fusion.bogus"):
        FusionModelConfig.from_dict({**cfg.to_dict(), "fusion": {"bogus": 1}})
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")


def test_overfits_a_batch_of_8(tokenizer, samples, sample_cfg):
    from mmcore.data import collate, decode_sample

    batch = collate([decode_sample(s, tokenizer, sample_cfg, train=False) for s in samples[:8]])
    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = PretrainLoss(label_smoothing=0.0)
    first, steps = None, 0
    while steps < 300:
        loss = loss_fn(model(batch, task="pretrain"))["loss"]
        first, steps = (first if first is not None else loss.item()), steps + 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, f"loss only fell from {first:.3f} to {loss.item():.3f} in {steps} steps"
