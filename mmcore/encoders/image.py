"""Image encoders: torchvision ResNet (18/50) or VisionTransformer, returning tokens and a pooled vector.

Both return `(tokens (B, N, D), pooled (B, D))` in the model width D:
- ViT: N = 1 + (image_size / patch_size)^2 (the class token first); pooled = the class token.
- ResNet: N = h * w of the last feature map (image_size / 32 squared); pooled = their mean.

Pretrained weights come only from a local torchvision state-dict file (`torch.load` with
`weights_only=True`, so nothing is unpickled); a ViT's position embeddings are interpolated when
the file was trained at another resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer, interpolate_embeddings

RESNETS = {"resnet18": (resnet18, 512), "resnet50": (resnet50, 2048)}


@dataclass
class ImageEncoderConfig:
    arch: str = "vit"  # vit | resnet18 | resnet50
    image_size: int = 64
    patch_size: int = 8  # ViT only
    num_layers: int = 2  # ViT only
    num_heads: int = 4  # ViT only
    hidden_dim: int = 128  # ViT only (ResNets have fixed widths)
    mlp_dim: int = 256  # ViT only
    # ViT only: "patch" = one linear patch embedding (the original ViT); "conv" = a stack of
    # stride-2 3x3 convolutions down to the patch grid (torchvision's conv stem, after Xiao et al.
    # 2021, "Early convolutions help transformers see better"): far faster to learn colour and shape
    # from little data, at the same token count.
    # "resnet" = ResNet-18's stem and residual stages down to the patch grid, then a 1x1 projection
    # (the "hybrid" ViT of Dosovitskiy et al. 2021): residual 3x3 blocks at every scale, for shapes
    # that span several patches.
    stem: str = "patch"
    # ViT with stem="conv" only: the first convolution's width; each later one doubles it, up to
    # hidden_dim. On a CPU the stem's early, high-resolution layers cost more than the whole
    # transformer of the debug preset; 16 halves their cost.
    stem_width: int = 32
    # ViT only: "learned" = torchvision's position table, trained from a random start; "sincos" = a
    # fixed 2-D sine-cosine table (row and column each get half the channels, as in MAE, He et al.
    # 2021): every patch knows its row and column from the first step.
    pos_embed: str = "learned"
    # ViT only: add a learned position table, initialised to the 2-D sine-cosine one, to the output
    # tokens, so that every reader of the tokens (the decoder's and the fusion's cross-attention)
    # gets each patch's row and column afresh. After the ViT's layers the input table is mixed
    # with the content, and "what shape is on the left?" needs a lookup by column (DETR adds
    # positions to the keys of every cross-attention layer for the same reason).
    output_pos: bool = False
    dropout: float = 0.0
    pretrained: str | None = None  # torchvision state-dict file (.pth), loaded by build


class ImageEncoder(nn.Module):
    """torchvision backbone + a linear projection to the model width `out_dim`."""

    def __init__(self, cfg: ImageEncoderConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "vit":
            self.backbone = _vit(cfg)
            width = cfg.hidden_dim
        elif cfg.arch in RESNETS:
            make, width = RESNETS[cfg.arch]
            self.backbone = make(weights=None)
            # The grid tokens come from layer4; the classifier is never used.
            self.backbone.fc = nn.Identity()
        else:
            raise ValueError(f"unknown image encoder arch {cfg.arch!r}; use vit, resnet18 or resnet50")
        self.proj = nn.Identity() if width == out_dim else nn.Linear(width, out_dim)
        if cfg.output_pos:  # only then: the state dict is otherwise unchanged
            if cfg.arch != "vit":
                raise ValueError(f"image.output_pos needs the vit image encoder, not {cfg.arch!r}")
            self.output_pos = nn.Parameter(sincos_2d(cfg.image_size // cfg.patch_size, out_dim))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images `(B, 3, H, W)` normalised -> `(tokens (B, N, D), pooled (B, D))`."""
        if self.cfg.arch == "vit":
            tokens = _vit_tokens(self.backbone, images)
            tokens = self.proj(tokens)
            if self.cfg.output_pos:
                tokens = tokens + self.output_pos
            return tokens, tokens[:, 0]
        tokens = self.proj(_resnet_tokens(self.backbone, images))
        return tokens, tokens.mean(dim=1)

    def load_pretrained(self, path: str | Path) -> None:
        """Load a torchvision state dict (e.g. `vit_b_16` / `resnet50` weights) from a local file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image encoder weights {path} not found; give a torchvision .pth file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad file; name the file once
            raise ValueError(f"{path} is not a torchvision state-dict file ({type(e).__name__}: {e})") from e
        # Classifier heads are not part of the encoder.
        state = {k: v for k, v in state.items() if not k.startswith(("heads.", "fc."))}
        if self.cfg.arch == "vit":
            pos = state.get("encoder.pos_embedding")
            if pos is not None and pos.shape != self.backbone.encoder.pos_embedding.shape:
                state = dict(interpolate_embeddings(self.cfg.image_size, self.cfg.patch_size, state))
        if self.cfg.arch == "vit" and ("conv_proj.weight" in state) != (self.cfg.stem == "patch"):
            kind = "a patch embedding" if "conv_proj.weight" in state else "a conv stem"
            raise ValueError(f"{path} holds a ViT with {kind} but the config asks for image.stem={self.cfg.stem!r}; "
                             f"set image.stem={'patch' if 'conv_proj.weight' in state else 'conv'} (model.overrides)")
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match a torchvision {self.cfg.arch}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; check model.image_encoder / the preset's sizes"
            )


def _vit(cfg: ImageEncoderConfig) -> VisionTransformer:
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    vit = VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        hidden_dim=cfg.hidden_dim,
        mlp_dim=cfg.mlp_dim,
        dropout=cfg.dropout,
        conv_stem_configs=_conv_stem(cfg),
    )
    vit.heads = nn.Identity()
    if cfg.stem == "resnet":
        vit.conv_proj = _resnet_stem(cfg.patch_size, cfg.hidden_dim)
    if cfg.pos_embed == "sincos":
        del vit.encoder.pos_embedding  # a fixed buffer in place of the trained parameter
        vit.encoder.register_buffer("pos_embedding", sincos_2d(cfg.image_size // cfg.patch_size, cfg.hidden_dim))
    elif cfg.pos_embed != "learned":
        raise ValueError(f"unknown image.pos_embed {cfg.pos_embed!r}; use learned or sincos")
    return vit


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed position table `(1, 1 + grid*grid, dim)` for a class token (zeros) then a row-major
    grid of patches: the first half of the channels encodes the row, the second the column, each as
    sines and cosines of geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"a sincos position table needs a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    angles = torch.arange(grid, dtype=torch.float32)[:, None] * freqs[None]  # (grid, dim/4)
    one_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim/2)
    rows = one_axis[:, None, :].expand(grid, grid, dim // 2)
    cols = one_axis[None, :, :].expand(grid, grid, dim // 2)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)
    return torch.cat([torch.zeros(1, dim), table])[None]


def _resnet_stem(patch_size: int, width: int) -> nn.Sequential:
    """torchvision ResNet-18 cut where its stride reaches `patch_size` (4, 8, 16 or 32), then a 1x1
    convolution to the ViT width: `(B, 3, S, S)` -> `(B, width, S/p, S/p)`."""
    stages = {4: 1, 8: 2, 16: 3, 32: 4}
    if patch_size not in stages:
        raise ValueError(f"a resnet stem needs patch_size 4, 8, 16 or 32 (ResNet-18's strides), got {patch_size}")
    net = resnet18(weights=None)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4][: stages[patch_size]]
    out = 64 * 2 ** (stages[patch_size] - 1)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *layers, nn.Conv2d(out, width, 1))


def _conv_stem(cfg: ImageEncoderConfig) -> list[ConvStemConfig] | None:
    """Stride-2 3x3 convolutions (BatchNorm, ReLU) whose strides multiply to the patch size, widths
    doubling from `stem_width` up to the ViT width; torchvision adds the final 1x1 projection."""
    if cfg.stem in ("patch", "resnet"):
        return None
    if cfg.stem != "conv":
        raise ValueError(f"unknown ViT stem {cfg.stem!r}; use patch, conv or resnet")
    n = cfg.patch_size.bit_length() - 1
    if cfg.patch_size < 2 or 2**n != cfg.patch_size:
        raise ValueError(f"a conv stem needs a power-of-two patch_size (stride 2 per layer), got {cfg.patch_size}")
    if cfg.stem_width < 1:
        raise ValueError(f"image.stem_width must be at least 1, got {cfg.stem_width}")
    widths = [min(cfg.stem_width * 2**i, cfg.hidden_dim) for i in range(n)]
    return [ConvStemConfig(out_channels=w, kernel_size=3, stride=2) for w in widths]


def _vit_tokens(vit: VisionTransformer, images: Tensor) -> Tensor:
    """All ViT output tokens `(B, 1 + P, hidden)`, class token first (torchvision keeps only [:, 0])."""
    x = vit._process_input(images)
    cls = vit.class_token.expand(x.shape[0], -1, -1)
    return vit.encoder(torch.cat([cls, x], dim=1))


def _resnet_tokens(net: nn.Module, images: Tensor) -> Tensor:
    """Last feature map of a torchvision ResNet as tokens `(B, h*w, C)`."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return x.flatten(2).transpose(1, 2)
