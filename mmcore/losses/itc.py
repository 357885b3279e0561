"""ITC: symmetric InfoNCE over image/text embeddings with the model's learnable temperature."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GatherFn = Callable[[Tensor], Tensor]


class ContrastiveLoss(nn.Module):
    """`(CE(s I T^T, diag) + CE(s T I^T, diag)) / 2`.

    gather_fn, when given, maps a local `(B, E)` tensor to the concatenation over all ranks
    `(W*B, E)` *with gradients* (training passes `pipelines.train.steps.gather_with_grad`: an
    all_gather whose backward all-reduces the gradient and hands each rank its own rows), so
    negatives come from every rank while this module stays free of distributed code. Each rank
    then computes the same global loss, as in open_clip with `local_loss=False`.
    """

    def __init__(self, gather_fn: GatherFn | None = None):
        super().__init__()
        self.gather_fn = gather_fn

    def forward(self, image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
        if self.gather_fn is not None:
            image_emb, text_emb = self.gather_fn(image_emb), self.gather_fn(text_emb)
        logits = logit_scale * image_emb @ text_emb.T  # (N, N), N = global batch
        if len(logits) == 0:  # nothing to contrast (e.g. no sample of the batch has audio): no signal
            return logits.sum() + 0.0 * logit_scale
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class WordRegionLoss(nn.Module):
    """FILIP's token-level contrastive loss (Yao et al. 2021), text-to-image side: a caption's
    similarity to an image is the mean, over its words, of each word's best-matching patch,
    `s(T, I) = mean_j max_n <w_j, p_n>`; then the symmetric InfoNCE of `ContrastiveLoss` over
    `token_scale * s`. Each word must find its region: "square" is pulled towards the patches of the
    square in its own image and pushed from the best-matching patch of every other image, a dense
    signal per object that the pooled ITC lacks.

    gather_fn as in `ContrastiveLoss` (it gathers along the first dimension, whatever the shape).
    """

    def __init__(self, gather_fn: GatherFn | None = None):
        super().__init__()
        self.gather_fn = gather_fn

    def forward(self, patch_emb: Tensor, word_emb: Tensor, word_mask: Tensor, token_scale: Tensor) -> Tensor:
        if self.gather_fn is not None:
            patch_emb, word_emb = self.gather_fn(patch_emb), self.gather_fn(word_emb)
            word_mask = self.gather_fn(word_mask.float())
        sims = word_region_similarity(word_emb, patch_emb, word_mask)  # (texts, images)
        logits = token_scale * sims
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def word_region_similarity(word_emb: Tensor, patch_emb: Tensor, word_mask: Tensor) -> Tensor:
    """`(T, L, E)` words, `(I, N, E)` patches, `(T, L)` mask -> `(T, I)`: for every caption and
    image, the mean over the caption's words of the word's highest similarity to a patch."""
    best = torch.einsum("tle,ine->tiln", word_emb, patch_emb).amax(dim=-1)  # (T, I, L)
    m = word_mask.to(best.dtype)[:, None, :]
    return (best * m).sum(-1) / m.sum(-1).clamp_min(1.0)
