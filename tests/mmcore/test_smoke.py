"""The whole mmcore interface surface (docs/interfaces.md) on the debug preset, end to end."""

from __future__ import annotations

import torch

from mmcore.checkpoint import load_checkpoint, save_checkpoint
from mmcore.data import decode_text, special_token_ids
from mmcore.losses import CaptionLoss, PretrainLoss, RetrievalLoss, VQALoss, build_loss
from mmcore.metrics import bleu4, cider_d, retrieval_recall, vqa_accuracy
from mmcore.model import FusionModelConfig, build_model, model_config


def test_debug_preset_end_to_end(batch, tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = model_config("debug", vocab_size=len(tokenizer), image_size=32, **special_token_ids(tokenizer))
    assert FusionModelConfig.from_dict(cfg.to_dict()) == cfg
    model = build_model(cfg)
    losses = {"pretrain": PretrainLoss(1.0, 1.0, 1.0, 0.1), "caption": CaptionLoss(),
              "vqa": VQALoss(), "retrieval": RetrievalLoss()}
    for task, loss_fn in losses.items():
        out = model(batch, task=task)
        result = loss_fn(out)
        assert torch.isfinite(result["loss"]), task
        result["loss"].backward()
        assert isinstance(build_loss(task, itc_weight=1.0, label_smoothing=0.1), type(loss_fn))

    model.eval()
    tokens, emb = model.encode_image(batch["image"])
    assert tokens.shape[:2] == (4, 1 + (32 // cfg.image.patch_size) ** 2) and emb.shape == (4, cfg.embed_dim)
    ttokens, temb = model.encode_text(batch["caption_ids"], batch["caption_mask"])
    assert temb.shape == (4, cfg.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert model.itm_logits(tokens, batch["caption_ids"], batch["caption_mask"]).shape == (4,)
    caps = decode_text(tokenizer, model.generate(batch["image"], max_len=8, num_beams=2))
    answers = model.generate(batch["image"], max_len=4, prompt_ids=batch["question_ids"],
                             prompt_mask=batch["question_mask"])
    assert len(caps) == 4 and answers.shape[0] == 4 and answers.shape[1] <= 4

    save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"step": 3})
    loaded, tok2, extra = load_checkpoint(tmp_path / "ckpt")
    assert extra == {"step": 3} and tok2.get_vocab() == tokenizer.get_vocab()
    assert torch.equal(loaded.encode_image(batch["image"])[1], emb)

    refs = {i: c for i, c in enumerate(batch["captions"])}
    cands = {i: c[0] for i, c in refs.items()}
    assert bleu4(cands, refs) > 0.99 and cider_d(cands, refs) > 0
    assert vqa_accuracy({0: "red"}, {0: ["red", "red", "red"]}) == 1.0
    r = retrieval_recall(emb, temb, torch.arange(4))
    assert set(r) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
