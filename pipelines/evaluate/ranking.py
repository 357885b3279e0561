"""Retrieval ranks over the whole test split (optionally ITM re-ranked) and ITM accuracy."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def pair_logits(model, image_tokens: Tensor, ids: Tensor, mask: Tensor, img: Tensor, txt: Tensor,
                batch_size: int) -> Tensor:
    """ITM logits `(P,)` for P (image index, text index) pairs, in batches."""
    out = []
    for s in range(0, len(img), batch_size):
        i, t = img[s: s + batch_size], txt[s: s + batch_size]
        out.append(model.itm_logits(image_tokens[i], ids[t], mask[t]).float())
    return torch.cat(out) if out else torch.zeros(0)


def rerank(sims: Tensor, correct: Tensor, base_rank: Tensor, k: int, itm) -> Tensor:
    """Re-rank each query's top-k candidates by a pair score (ITM; the audio-text likelihood).

    sims `(Q, C)` similarities, correct `(Q, C)` bool, base_rank `(Q,)` ITC ranks; itm(q, c)
    gives scores (higher: better match) for flat index tensors. A query whose match is outside the top-k keeps its rank;
    inside it, the rank is the number of top-k candidates with a higher ITM logit (ties favour it).
    """
    k = min(k, sims.shape[1])
    top = sims.topk(k, dim=1).indices  # (Q, k)
    q = torch.arange(len(sims))[:, None].expand_as(top)
    logits = itm(q.reshape(-1), top.reshape(-1)).view(len(sims), k)
    hit = correct.gather(1, top)  # (Q, k)
    best = logits.masked_fill(~hit, float("-inf")).max(dim=1).values
    new = (logits.masked_fill(hit, float("-inf")) > best[:, None]).sum(1)
    return torch.where(hit.any(1), new, base_rank)


def reranked_ranks(model, merged: dict, rerank_k: int, batch_size: int) -> dict[str, Tensor]:
    """`{"i2t": (Ni,), "t2i": (Nt,)}` 0-based ranks (mmcore's convention): the ITC ranks of
    `mmcore.metrics.retrieval_ranks`, each query's top `rerank_k` re-ranked by ITM when k > 0."""
    from mmcore.data import pad_ids
    from mmcore.metrics import retrieval_ranks

    img_emb, txt_emb, owner = merged["image_emb"], merged["text_emb"], merged["text_owner"]
    ranks = retrieval_ranks(img_emb, txt_emb, owner)
    if rerank_k <= 0:
        return ranks
    ids, mask = pad_ids([torch.tensor(t) for t in merged["text_ids"]], model.cfg.pad_id)
    tokens = merged["image_tokens"]
    sims = img_emb.float() @ txt_emb.float().T  # (Ni, Nt)
    correct = owner[None, :] == torch.arange(len(img_emb))[:, None]
    i2t = rerank(sims, correct, ranks["i2t"], rerank_k,
                  lambda q, c: pair_logits(model, tokens, ids, mask, q, c, batch_size))
    t2i = rerank(sims.T, correct.T, ranks["t2i"], rerank_k,
                  lambda q, c: pair_logits(model, tokens, ids, mask, c, q, batch_size))
    return {"i2t": i2t, "t2i": t2i}


def itm_pairs(merged: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: its first (primary) caption and its hardest negative caption (highest ITC
    similarity among other images' captions). Returns `(images, pos_text, neg_text)`, each
    `(M,)`, over the M images that have a negative (all but a one-image split).

    A caption word for word the same as one of the image's own is never its negative: another
    image's "a red circle" describes this red circle too (a fifth of the synthetic test
    captions are shared so), and training never uses such a pair as a negative either."""
    owner = merged["text_owner"]
    n = len(merged["image_emb"])
    sims = merged["image_emb"].float() @ merged["text_emb"].float().T
    own = (owner[None, :] == torch.arange(n)[:, None]) | same_text_as_own(merged["text_ids"], owner, n)
    neg = sims.masked_fill(own, float("-inf")).argmax(dim=1)
    first = torch.full((n,), -1, dtype=torch.long)
    for t in range(len(owner) - 1, -1, -1):  # the lowest text index of each image
        first[owner[t]] = t
    keep = (~own).any(dim=1) & (first >= 0)
    images = torch.arange(n)[keep]
    return images, first[keep], neg[keep]


def same_text_as_own(text_ids: list[list[int]], owner: Tensor, n: int) -> Tensor:
    """`(n, T)` bool: caption t reads exactly like one of image i's own captions."""
    index: dict[tuple[int, ...], int] = {}
    key = torch.tensor([index.setdefault(tuple(ids), len(index)) for ids in text_ids], dtype=torch.long)
    owns = torch.zeros(n, len(index), dtype=torch.bool)
    owns[owner, key] = True
    return owns[:, key]


def itm_logits(model, merged: dict, batch_size: int) -> dict[int, tuple[float, float, int]]:
    """`{image index: (positive logit, negative logit, negative text index)}`."""
    from mmcore.data import pad_ids

    images, pos, neg = itm_pairs(merged)
    if len(images) == 0:
        return {}
    ids, mask = pad_ids([torch.tensor(t) for t in merged["text_ids"]], model.cfg.pad_id)
    tokens = merged["image_tokens"]
    lp = pair_logits(model, tokens, ids, mask, images, pos, batch_size)
    ln = pair_logits(model, tokens, ids, mask, images, neg, batch_size)
    return {int(i): (float(a), float(b), int(t)) for i, a, b, t in zip(images, lp, ln, neg, strict=True)}
