"""Preset parameter counts, on the meta device (no real weights are allocated)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet50, vit_b_16, vit_l_16
from transformers import BertConfig, BertModel

from mmcore.model import build_model, count_parameters, model_config


def _meta_count(module_fn) -> int:
    with torch.device("meta"):
        return count_parameters(module_fn())


def _parts(preset: str, **kw) -> dict[str, int]:
    with torch.device("meta"):
        model = build_model(model_config(preset, **kw), load_pretrained=False)
    assert all(p.is_meta for p in model.parameters())
    parts = {name: count_parameters(getattr(model, name))
             for name in ("image_encoder", "text_encoder", "fusion", "decoder", "heads")}
    parts["total"] = count_parameters(model)
    return parts


def test_base_preset_matches_vit_b16_and_bert_base():
    p = _parts("base")
    vit = _meta_count(vit_b_16)
    head = 768 * 1000 + 1000  # the ImageNet classifier is not part of the encoder
    assert p["image_encoder"] == vit - head  # width 768 = model width: no projection
    bert = _meta_count(lambda: BertModel(BertConfig(), add_pooling_layer=False))  # BERT-base defaults
    assert p["text_encoder"] == bert == 108_891_648
    # + 6 fusion layers (56.7M) + a 6-layer decoder with its own 30522-word embedding and head (103.7M)
    assert 340e6 < p["total"] < 370e6, p


def test_large_preset_matches_vit_l16_and_bert_large_at_about_1b():
    p = _parts("large")
    assert p["image_encoder"] == _meta_count(vit_l_16) - (1024 * 1000 + 1000)  # minus the classifier
    bert_large = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    assert p["text_encoder"] == _meta_count(lambda: BertModel(bert_large, add_pooling_layer=False)) == 334_092_288
    # + 12 fusion layers (201.6M) + a 12-layer decoder with its embedding and head (264.2M)
    assert p["total"] == sum(v for k, v in p.items() if k != "total")
    assert 1.0e9 < p["total"] < 1.2e9, p


def test_base_preset_with_resnet50():
    p = _parts("base", image_encoder="resnet50")
    r50 = _meta_count(resnet50) - (2048 * 1000 + 1000)
    assert p["image_encoder"] == r50 + 2048 * 768 + 768  # backbone + projection to width 768


@pytest.mark.parametrize("preset,low,high", [("debug", 0.5e6, 3e6), ("small", 35e6, 50e6)])
def test_small_presets(preset, low, high):
    p = _parts(preset)
    assert low < p["total"] < high, p
    assert p["total"] == sum(v for k, v in p.items() if k != "total")


def test_the_debug_preset_sees_through_a_conv_stem():
    """The debug ViT embeds 16 px patches with stride-2 convolutions (a 96 px image -> 6x6 tokens)."""
    import torch
    from torch import nn

    from mmcore.encoders import ImageEncoder, ImageEncoderConfig

    enc = ImageEncoder(model_config("debug").image, 128)
    convs = [m for m in enc.backbone.conv_proj.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)]  # four stride-2 layers, then the 1x1
    tokens, pooled = enc(torch.zeros(2, 3, 96, 96))
    assert tokens.shape == (2, 1 + 6 * 6, 128) and pooled.shape == (2, 128)
    assert [c.out_channels for c in convs[:4]] == [32, 64, 128, 128]  # doubling from stem_width, capped
    narrow = ImageEncoder(ImageEncoderConfig(image_size=96, patch_size=32, hidden_dim=128, stem="conv", stem_width=16), 128)
    narrow_convs = [m for m in narrow.backbone.conv_proj.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in narrow_convs] == [16, 32, 64, 128, 128, 128]  # 5 stride-2 layers, the 1x1
    assert narrow(torch.zeros(2, 3, 96, 96))[0].shape == (2, 1 + 3 * 3, 128)
    with pytest.raises(ValueError, match="stem_width must be at least 1"):
        ImageEncoder(ImageEncoderConfig(image_size=96, patch_size=32, stem="conv", stem_width=0), 128)
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ImageEncoder(ImageEncoderConfig(image_size=48, patch_size=12, stem="conv"), 128)
    with pytest.raises(ValueError, match="unknown ViT stem"):
        ImageEncoder(ImageEncoderConfig(stem="pixels"), 128)


def test_a_resnet_stem_feeds_the_vit_a_residual_feature_map():
    """stem=resnet: ResNet-18 cut at the patch size's stride (8 -> after layer2), then a 1x1 to the ViT width."""
    import torch
    from torch import nn

    from mmcore.encoders import ImageEncoder, ImageEncoderConfig

    enc = ImageEncoder(ImageEncoderConfig(image_size=64, patch_size=8, hidden_dim=96, stem="resnet"), 96)
    stem = enc.backbone.conv_proj
    assert sum(isinstance(m, nn.Sequential) for m in stem.children()) == 2  # layer1 and layer2
    assert stem[-1].in_channels == 128 and stem[-1].out_channels == 96
    tokens, pooled = enc(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 1 + 8 * 8, 96) and pooled.shape == (2, 96)
    tokens.sum().backward()
    assert stem[0].weight.grad.abs().sum() > 0  # the stem trains with the ViT
    with pytest.raises(ValueError, match="patch_size 4, 8, 16 or 32"):
        ImageEncoder(ImageEncoderConfig(image_size=48, patch_size=12, stem="resnet"), 128)


def test_a_sincos_position_table_tells_each_patch_its_row_and_column():
    """image.pos_embed=sincos: a fixed buffer (not trained, not a parameter); the first half of the
    channels depends only on the row, the second only on the column; the class token gets zeros."""
    import torch

    from mmcore.encoders import ImageEncoder, ImageEncoderConfig
    from mmcore.encoders.image import sincos_2d

    table = sincos_2d(4, 16)[0]
    assert table.shape == (1 + 16, 16) and table[0].abs().sum() == 0
    grid = table[1:].view(4, 4, 16)  # (row, column, channel)
    assert torch.equal(grid[:, 0, :8], grid[:, 3, :8]) and not torch.equal(grid[0, :, :8], grid[3, :, :8])
    assert torch.equal(grid[0, :, 8:], grid[3, :, 8:]) and not torch.equal(grid[:, 0, 8:], grid[:, 3, 8:])
    # sin at angle 0 (row 0) is 0 and cos is 1, in the row half; the lowest frequency is 1 rad per row
    assert torch.equal(grid[0, 0, :4], torch.zeros(4)) and torch.equal(grid[0, 0, 4:8], torch.ones(4))
    assert torch.allclose(grid[2, 0, 0], torch.sin(torch.tensor(2.0)))

    cfg = ImageEncoderConfig(image_size=32, patch_size=8, hidden_dim=64, stem="conv", pos_embed="sincos")
    enc = ImageEncoder(cfg, 64)
    names = [n for n, _ in enc.named_parameters()]
    assert not any("pos_embedding" in n for n in names)
    assert torch.equal(enc.state_dict()["backbone.encoder.pos_embedding"], sincos_2d(4, 64))
    tokens, _ = enc(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 17, 64)
    with pytest.raises(ValueError, match="unknown image.pos_embed"):
        ImageEncoder(ImageEncoderConfig(pos_embed="rotary"), 128)


def test_output_pos_adds_a_trained_position_table_to_the_output_tokens():
    """image.output_pos: a parameter, initialised to the sine-cosine table in the model width,
    added to every output token (the class token's row starts at zero); it trains; off, the state
    dict has no such key. A ResNet has no patch grid of the ViT's kind and is refused."""
    import torch

    from mmcore.encoders import ImageEncoder, ImageEncoderConfig
    from mmcore.encoders.image import sincos_2d

    torch.manual_seed(0)
    base = dict(image_size=32, patch_size=8, hidden_dim=64, stem="conv", pos_embed="sincos")
    plain = ImageEncoder(ImageEncoderConfig(**base), 32)
    enc = ImageEncoder(ImageEncoderConfig(**base, output_pos=True), 32)
    assert "output_pos" not in plain.state_dict()
    assert torch.equal(enc.output_pos.detach(), sincos_2d(4, 32))
    enc.load_state_dict({**plain.state_dict(), "output_pos": enc.output_pos.detach()})  # same weights otherwise
    images = torch.randn(2, 3, 32, 32)
    tokens, pooled = enc(images)
    assert torch.allclose(tokens, plain(images)[0] + sincos_2d(4, 32), atol=1e-6)
    assert torch.equal(pooled, tokens[:, 0])
    tokens[:, 1:].sum().backward()
    assert enc.output_pos.grad[0, 1:].abs().sum() > 0
    with pytest.raises(ValueError, match="output_pos needs the vit"):
        ImageEncoder(ImageEncoderConfig(arch="resnet18", output_pos=True), 32)
