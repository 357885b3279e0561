"""Checkpoint round trip, clear failures, and loading pretrained weights saved by the test itself."""

from __future__ import annotations

import json

import pytest
import torch
from mmcore_support import tiny_config
from torchvision.models import resnet18
from torchvision.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertModel

from mmcore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mmcore.model import build_model


def test_round_trip_is_bitwise_identical(tiny_model, tokenizer, batch, tmp_path):
    save_checkpoint(tmp_path, tiny_model, tokenizer, {"step": 7})
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    model, tok, extra = load_checkpoint(tmp_path)
    assert extra == {"step": 7} and tok("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    torch.manual_seed(0)
    a = tiny_model(batch, task="pretrain")
    torch.manual_seed(0)
    b = model(batch, task="pretrain")
    assert torch.equal(a.itm_logits, b.itm_logits) and torch.equal(a.lm_logits, b.lm_logits)
    assert torch.equal(tiny_model.generate(batch["image"], 8, 2), model.generate(batch["image"], 8, 2))


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tiny_model, tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(tmp_path, tiny_model, tokenizer)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(tmp_path)
    weights.write_bytes(good)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["decoder"]["num_layers"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config.json.*missing.*decoder.layers.2"):
        load_checkpoint(tmp_path)
    cfg["model"]["decoder"]["num_layers"] -= 1
    cfg["model"]["text"]["vocab_size"] += 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_pretrained_vit_weights_with_interpolation(tokenizer, tmp_path):
    torch.manual_seed(0)
    src = VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    cfg = tiny_config(tokenizer, image_pretrained=str(tmp_path / "vit.pth"), **{"image.num_heads": 2})
    with pytest.raises(ValueError, match="set image.stem=patch"):  # torchvision ViTs embed patches linearly
        build_model(cfg)
    cfg.image.stem = "patch"
    model = build_model(cfg)  # config image size 32: position embeddings are interpolated
    enc = model.image_encoder.backbone
    assert torch.equal(enc.conv_proj.weight, src.conv_proj.weight)
    assert torch.equal(enc.encoder.layers[1].mlp[0].weight, src.encoder.layers[1].mlp[0].weight)
    assert enc.encoder.pos_embedding.shape == (1, 1 + 16, 32)


def test_pretrained_resnet_weights(tokenizer, tmp_path):
    torch.manual_seed(0)
    src = resnet18()
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = build_model(tiny_config(tokenizer, image_encoder="resnet18", image_pretrained=str(tmp_path / "r18.pth")))
    assert torch.equal(model.image_encoder.backbone.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="bad.pth is not a torchvision state-dict"):
        build_model(tiny_config(tokenizer, image_encoder="resnet18", image_pretrained=str(tmp_path / "bad.pth")))


def test_pretrained_bert_directory(tokenizer, batch, tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=96, max_position_embeddings=40))
    bert.save_pretrained(str(tmp_path / "bert"))
    cfg = tiny_config(tokenizer, text_pretrained=str(tmp_path / "bert"))
    model = build_model(cfg).eval()
    assert model.cfg.text.hidden_size == 48 and model.cfg.text.num_layers == 1  # sizes from the dir
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    ref = bert.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(model.text_encoder(ids, mask)[0], ref, atol=1e-6)
    with pytest.raises(ValueError, match="knows only"):
        build_model(tiny_config(tokenizer, text_pretrained=str(tmp_path / "bert"), vocab_size=len(tokenizer) + 5))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.text_encoder(ids, mask)[0], model.text_encoder(ids, mask)[0])
