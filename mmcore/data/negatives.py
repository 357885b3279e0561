"""One-word-edited captions as ITM negatives: the hardest text negatives a batch can give.

A matching head trained only on other images' captions learns to reject texts that differ in
several places; evaluation's hardest negative often differs from the true caption in one word (a
size, a colour, "left" for "right"). An edited negative is the image's own caption with one token
replaced by the token that another caption of the batch has at the aligned place, where the two
differ by a replacement of equal length (a token-level diff, `difflib.SequenceMatcher`): "a small
red circle on the left" and "a large blue square on the left" give "a small blue circle on the
left". The partner is the batch's caption likest in form, so the swap is a word of the same kind
in the same role and the negative reads as well as the positive.

A candidate that reads exactly like any of the image's own captions is not a negative (swapping
"one" for "a" in "one small red circle" says the same thing) and is never used. NegCLIP (Yuksekgonul
et al. 2023) builds such negatives by reordering words; this swaps them between captions instead,
which needs no parser and works for any tokenizer.

A swapped negative exchanges two words of one kind inside the caption itself: "a small red circle
left of a large blue square" gives "a small blue circle left of a large red square". It holds the
same words as the truth, so only the binding of each word to its object tells it apart: the
negative that a bag of words cannot reject, and the one the matching head missed most often at
evaluation (bench/results/learning-2026-12-03-d.md). Two words are of one kind when the batch shows
one in the other's place, between captions of one form; that too needs no parser.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def edit_candidates(ids: Sequence[int], other: Sequence[int]) -> list[tuple[int, int]]:
    """`(i, j)` pairs: position i of `ids` may take `other[j]`, from the equal-length replacements
    of the token diff between the two (positions where the captions are aligned and differ)."""
    matcher = difflib.SequenceMatcher(a=list(ids), b=list(other), autojunk=False)
    return [(i1 + k, j1 + k) for tag, i1, i2, j1, j2 in matcher.get_opcodes()
            if tag == "replace" and i2 - i1 == j2 - j1 for k in range(i2 - i1)]


def edit_negative(ids: Sequence[int], others: Sequence[Sequence[int]], own: set[tuple[int, ...]],
                  rng, tries: int = 4) -> tuple[int, ...] | None:
    """`ids` with one token swapped in from one of `others` (tried in the given order, at most
    `tries` of them; a random aligned place in each), such that the result is none of `own`; None
    when no such edit exists."""
    for other in others[:tries]:
        spots = edit_candidates(ids, other)
        rng.shuffle(spots)
        for i, j in spots:
            edited = (*ids[:i], other[j], *ids[i + 1:])
            if edited not in own:
                return edited
    return None


def likeness(a: Sequence[int], b: Sequence[int]) -> int:
    """How alike two captions are in form: the number of places where they hold the same token, if
    they have the same length (the same template, as a rule), else -1. Editing a caption from its
    likest partner swaps a word for one in the same role ("left" for "right"), so the negative stays
    grammatical and only the image can tell it apart; a partner of another form gives edits such as
    "in the left" that the text alone betrays."""
    return sum(x == y for x, y in zip(a, b, strict=True)) if len(a) == len(b) else -1


def word_kinds(captions: Sequence[Sequence[int]], partners: Sequence[Sequence[Sequence[int]]],
               tries: int = 4) -> dict[int, int]:
    """`{token: kind}`: two tokens are of one kind when one stands in the other's place (an aligned
    replacement, `edit_candidates`) between a caption and one of its first `tries` `partners` that
    has its form (the same length, and the same token in at least half the places), and kinds are
    closed under that relation. Captions of other forms align words of different roles ("a" with
    "there"), so they count for nothing."""
    parent: dict[int, int] = {}

    def root(t: int) -> int:
        while parent.setdefault(t, t) != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for ids, others in zip(captions, partners, strict=True):
        for other in others[:tries]:
            if 2 * likeness(ids, other) < len(ids):
                continue
            for i, j in edit_candidates(ids, other):
                parent[root(ids[i])] = root(other[j])
    return {t: root(t) for t in parent}


def swap_negative(ids: Sequence[int], kinds: dict[int, int], own: set[tuple[int, ...]],
                  rng) -> tuple[int, ...] | None:
    """`ids` with two different tokens of one kind (`word_kinds`) exchanged, at a random pair of
    places, such that the result is none of `own`; None when no such swap exists."""
    spots = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))
             if ids[i] != ids[j] and ids[i] in kinds and kinds.get(ids[j]) == kinds[ids[i]]]
    rng.shuffle(spots)
    for i, j in spots:
        swapped = list(ids)
        swapped[i], swapped[j] = ids[j], ids[i]
        if tuple(swapped) not in own:
            return tuple(swapped)
    return None


def batch_edit_negatives(captions: Sequence[Sequence[int]], variants: Sequence[Sequence[Sequence[int]]],
                         rng, swap_share: float = 0.0) -> list[tuple[int, ...] | None]:
    """Per sample, an edited negative of its caption `captions[b]` from the batch's other captions,
    likest first (ties in a random order), never one of its own captions `variants[b]` (every
    caption of that image); None where none. With `swap_share` > 0, that share of the samples
    (drawn at random) get a swapped negative (`swap_negative`) instead, where their caption has one."""
    kinds = {}
    if swap_share > 0:  # the likest partners, in a fixed order (ties by position), before any draw
        kinds = word_kinds(captions, [sorted((c for k, c in enumerate(captions) if k != b),
                                             key=lambda c, ids=ids: likeness(ids, c), reverse=True)
                                      for b, ids in enumerate(captions)])
    out = []
    for b, ids in enumerate(captions):
        others = [c for k, c in enumerate(captions) if k != b]
        keys = {k: (likeness(ids, c), rng.random()) for k, c in enumerate(others)}
        others = [others[k] for k in sorted(keys, key=keys.get, reverse=True)]
        own = {tuple(v) for v in variants[b]} | {tuple(ids)}
        swapped = swap_negative(ids, kinds, own, rng) if swap_share > 0 and rng.random() < swap_share else None
        out.append(swapped or edit_negative(tuple(ids), others, own, rng))
    return out
