"""Where the decoder looks: greedy generation that keeps its cross-attention over the image patches.

For each generated token, the decoder's cross-attention weights (averaged over layers and heads)
are restricted to the image's patch tokens and laid out on the patch grid, so a caller can draw a
heatmap per word. Works for captions (memory = image tokens) and answers (memory = fused question
tokens, then image tokens: only the image part is kept, renormalised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mmcore.decoders import greedy_search
from mmcore.modules import record_attention


@dataclass
class AttentionMaps:
    """tokens `(T,)` generated after BOS (EOS included when generated); maps `(T, g, g)` with each
    map summing to 1 over the patch grid; image_share `(T,)` the attention mass on the image before
    renormalising (a ViT's class token, and for answers the question tokens, take the rest)."""

    tokens: Tensor
    maps: Tensor
    image_share: Tensor


def patch_range(model, num_image_tokens: int) -> tuple[int, int]:
    """`(start, grid side)` of the patch tokens among the image tokens: a ViT puts its class token
    first; a ResNet's tokens are all grid cells."""
    start = 1 if model.cfg.image.arch == "vit" else 0
    side = math.isqrt(num_image_tokens - start)
    if side * side != num_image_tokens - start:
        raise ValueError(f"{num_image_tokens - start} patch tokens do not form a square grid")
    return start, side


@torch.no_grad()
def generate_with_attention(model, image: Tensor, max_len: int, prompt_ids: Tensor | None = None) -> AttentionMaps:
    """Greedy caption (or, with `prompt_ids (1, Lq)`, answer) for one image `(1, 3, S, S)` and the
    decoder's cross-attention over its patch grid for every generated token."""
    if image.shape[0] != 1:
        raise ValueError(f"explain one image at a time, got a batch of {image.shape[0]}")
    model.eval()
    image_tokens, _ = model.image_encoder(image)
    prompt = {}
    if prompt_ids is None:
        memory, memory_mask, offset = image_tokens, None, 0
    else:
        mask = (prompt_ids != model.cfg.pad_id).long()
        memory, memory_mask = model._vqa_memory(image_tokens, prompt_ids, mask)
        offset = prompt_ids.shape[1]
        if model.cfg.question_prefix:  # the question is also read by the decoder, before BOS
            prompt = {"prompt": prompt_ids, "prompt_mask": mask}
    layers = {f"layer{i}": layer.cross_attn for i, layer in enumerate(model.decoder.layers)}
    c = model.cfg
    with record_attention(layers) as records:
        tokens = greedy_search(model.decoder, memory, memory_mask, c.bos_id, c.eos_id, c.pad_id, max_len, True,
                               **prompt)
    # records[name][t]: (1, H, q, M) at step t, the last query generating; mean over layers and heads -> (T, M).
    steps = len(records["layer0"])
    weights = torch.stack([torch.cat([records[n][t][:, :, -1] for n in layers]).mean(dim=(0, 1)) for t in range(steps)])
    start, side = patch_range(model, image_tokens.shape[1])
    patches = weights[:, offset + start: offset + start + side * side]
    share = patches.sum(-1)
    maps = (patches / share.clamp_min(1e-12)[:, None]).view(steps, side, side)
    return AttentionMaps(tokens[0, :steps], maps, share)


def peak_cell(attention_map: Tensor) -> tuple[float, float]:
    """The centre `(x, y)` of the most-attended grid cell, as fractions of the image side."""
    side = attention_map.shape[-1]
    row, col = divmod(int(attention_map.flatten().argmax()), side)
    return (col + 0.5) / side, (row + 0.5) / side
