"""Image-text retrieval: per-query ranks of the first correct match, and recall@K, computed in chunks
so memory stays `O(chunk * N)` rather than `O(N_images * N_texts)`."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk: int = 256) -> dict:
    """0-based rank of the first correct match for every query.

    image_emb `(Ni, E)`, text_emb `(Nt, E)` (L2-normalised), text_to_image `(Nt,)` image index of
    each text (several texts per image). Returns `{"i2t": (Ni,), "t2i": (Nt,)}` LongTensors; an
    image with no text gets rank Nt (never found). Ties count in the query's favour.
    """
    text_to_image = torch.as_tensor(text_to_image, device=text_emb.device).long()
    n_img, n_txt = len(image_emb), len(text_emb)
    if len(text_to_image) != n_txt:
        raise ValueError(f"text_to_image has {len(text_to_image)} entries for {n_txt} texts")
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image indices must lie in [0, {n_img}) for {n_img} images")
    i2t = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk):
        sims = image_emb[s: s + chunk].float() @ text_emb.float().T  # (c, Nt)
        correct = text_to_image[None, :] == torch.arange(s, s + len(sims), device=sims.device)[:, None]
        best = sims.masked_fill(~correct, float("-inf")).max(dim=1).values  # (c,)
        rank = (sims.masked_fill(correct, float("-inf")) > best[:, None]).sum(1)
        i2t[s: s + len(sims)] = torch.where(correct.any(1), rank, torch.full_like(rank, n_txt)).cpu()
    t2i = torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, chunk):
        sims = text_emb[s: s + chunk].float() @ image_emb.float().T  # (c, Ni)
        target = sims.gather(1, text_to_image[s: s + chunk, None])  # (c, 1)
        t2i[s: s + len(sims)] = (sims > target).sum(1).cpu()
    return {"i2t": i2t, "t2i": t2i}


def recall_from_ranks(ranks: dict, ks=(1, 5, 10)) -> dict[str, float]:
    """`{"i2t_r1", ..., "t2i_r10"}` as fractions in [0, 1] from `retrieval_ranks` output (or a resample)."""
    return {f"{d}_r{k}": float((torch.as_tensor(ranks[d]) < k).float().mean()) for d in ("i2t", "t2i") for k in ks}


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks=(1, 5, 10),
                     chunk: int = 256) -> dict[str, float]:
    """Image->text and text->image recall@K (fractions in [0, 1])."""
    return recall_from_ranks(retrieval_ranks(image_emb, text_emb, text_to_image, chunk), ks)
