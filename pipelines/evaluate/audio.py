"""The audio parts of evaluation: speech-recognition word errors (jiwer), audio-text retrieval
ranks, spoken-VQA scores, and the fields they add to a per-sample record
(`pipelines.core.records`).

Transcripts are compared as words: lower case, punctuation dropped (`normalise`), so that "A red
circle." and "a red circle" are the same sentence. The synthetic set's captions repeat, so in
retrieval any text equal to a clip's transcript is a hit (and any clip speaking the text).

Retrieval ranks by the contrastive embeddings, and with `eval.audio_rerank_k` re-ranks each
query's top k by log p(text | clip) under the speech-recognition decoder: the pooled embedding
is a fast first pass, the decoder, which reads the clip token by token, the judge (as BLIP
re-ranks image-text candidates with its matching head).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from pipelines.evaluate.ranking import rerank

PairScore = Callable[[Tensor, Tensor], Tensor]  # (clip indices (P,), text indices (P,)) -> scores (P,)

_WORD = re.compile(r"[a-z0-9']+")


def normalise(text: str) -> str:
    """Lower-cased words separated by single spaces, punctuation dropped."""
    return " ".join(_WORD.findall(text.lower()))


def wer_counts(reference: str, hypothesis: str) -> tuple[int, int]:
    """`(errors, reference words)` of a transcript: substitutions + deletions + insertions by
    jiwer's word alignment, after `normalise`. An empty reference counts its insertions over 0 words."""
    import jiwer

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return len(hyp.split()), 0
    if not hyp:
        return len(ref.split()), len(ref.split())
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def _ranks(sim: Tensor, same: Tensor) -> Tensor:
    """0-based rank per row of `sim (N, M)` of its best-scoring target (`same (N, M)` True)."""
    best = sim.masked_fill(~same, -torch.inf).amax(dim=1, keepdim=True)
    return (sim > best).sum(dim=1)


def audio_text_ranks(audio_emb: Tensor, text_emb: Tensor, transcripts: list[str], score: PairScore | None = None,
                     k: int = 0) -> tuple[list[int], list[int]]:
    """Ranks for audio->text and text->audio retrieval over N clips `(N, E)` and their transcripts'
    embeddings `(N, E)`: a2t[i] the rank of the best text equal to clip i's transcript among all N
    texts, t2a[i] the rank of the best clip speaking text i among all N clips. With `score` and
    k > 0, each query's top k are re-ranked by `score(clips, texts)` (`likelihood_score`)."""
    words = [normalise(t) for t in transcripts]
    same = torch.tensor([[a == b for b in words] for a in words], dtype=torch.bool)
    sim = audio_emb.float() @ text_emb.float().T
    a2t, t2a = _ranks(sim, same), _ranks(sim.T, same)
    if score is not None and k > 0:
        a2t = rerank(sim, same, a2t, k, lambda clip, text: score(clip, text))
        t2a = rerank(sim.T, same.T, t2a, k, lambda text, clip: score(clip, text))
    return a2t.tolist(), t2a.tolist()


def likelihood_score(model, tokens: list[Tensor], ids: list[list[int]], batch_size: int) -> PairScore:
    """`score(clips, texts)`: log p(text | clip) (`FusionModel.transcript_log_likelihood`) for
    pairs of indices into `tokens` (each clip's valid audio tokens `(N_i, D)`) and `ids` (each
    text's token ids), `batch_size` pairs at a time."""
    from mmcore.data import pad_ids, pad_tokens

    def score(clips: Tensor, texts: Tensor) -> Tensor:
        out = []
        for s in range(0, len(clips), batch_size):
            memory, memory_mask = pad_tokens([tokens[i] for i in clips[s: s + batch_size].tolist()])
            text_ids, text_mask = pad_ids([torch.tensor(ids[j]) for j in texts[s: s + batch_size].tolist()],
                                          model.cfg.pad_id)
            out.append(model.transcript_log_likelihood(memory, memory_mask, text_ids, text_mask))
        return torch.cat(out) if out else torch.zeros(0)

    return score


def audio_caption_fields(merged: dict) -> list[dict | None]:
    """Per test sample, the caption written from the image and its spoken description:
    `{"generated", "bleu_stats"}` (BLEU-4 statistics against all the image's captions), None
    without audio (or from outputs that predate the task)."""
    from mmcore.metrics import bleu4_stats

    written = merged.get("audio_captions") or [None] * len(merged["keys"])
    cands = {i: c for i, c in enumerate(written) if c is not None}
    stats = bleu4_stats(cands, {i: list(merged["captions"][i]) for i in cands}) if cands else {}
    return [{"generated": c, "bleu_stats": [float(x) for x in stats[i]]} if c is not None else None
            for i, c in enumerate(written)]


def audio_fields(merged: dict, vqa_scores, model=None, rerank_k: int = 0, batch_size: int = 64) -> list[dict]:
    """Per test sample: `asr` ({reference, hypothesis, errors, words} or None), `audio_caption`
    (`audio_caption_fields`), `a2t_rank` and `t2a_rank` (None without audio; re-ranked by `model`'s
    likelihood when `rerank_k` > 0) and `spoken_vqa` (the scored spoken questions, through
    `vqa_scores(qa, answers)`, the typed VQA's scorer)."""
    has = [t is not None for t in merged["transcripts"]]
    captions = audio_caption_fields(merged)
    keep = [i for i, h in enumerate(has) if h]
    a2t, t2a = ([], [])
    if keep:
        score = None
        if rerank_k > 0:
            if "audio_tokens" not in merged:
                raise ValueError("audio re-ranking needs the clips' audio tokens: infer with "
                                 "InferenceSettings(audio_tokens=True) (settings_for does when eval.audio_rerank_k > 0)")
            score = likelihood_score(model, [merged["audio_tokens"][i] for i in keep],
                                     [merged["transcript_ids"][i] for i in keep], batch_size)
        a2t, t2a = audio_text_ranks(merged["audio_emb"][keep], merged["transcript_emb"][keep],
                                    [merged["spoken_captions"][i] for i in keep], score, rerank_k)
    rank = {i: (a2t[j], t2a[j]) for j, i in enumerate(keep)}
    out = []
    for i, hyp in enumerate(merged["transcripts"]):
        ref = merged["spoken_captions"][i]
        asr = None
        if hyp is not None:
            errors, words = wer_counts(ref, hyp)
            asr = {"reference": ref, "hypothesis": hyp, "errors": errors, "words": words}
        spoken = [(p, a) for p, a in zip(merged["qa"][i], merged["spoken_answers"][i], strict=True) if a is not None]
        out.append({"asr": asr, "audio_caption": captions[i], "a2t_rank": rank.get(i, (None, None))[0], "t2a_rank": rank.get(i, (None, None))[1],
                    "spoken_vqa": vqa_scores([p for p, _ in spoken], [a for _, a in spoken])})
    return out
