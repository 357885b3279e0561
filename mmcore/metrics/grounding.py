"""Grounding of generated captions in scenes whose objects are known (e.g. the synthetic shapes set).

A caption is grounded when the `<size> <colour> <shape>` phrases it states are the scene's objects.
Per caption we count true positives (phrases that match an object, each object matched once),
false positives (phrases naming no object of the scene) and false negatives (objects never named);
`grounding_f1` over a set of captions is `2 TP / (2 TP + FP + FN)` of the summed counts. A fluent
caption that names the wrong colour scores an FP and an FN, which BLEU barely notices.

Question types for VQA accuracy by type are also named here, so evaluation and benchmarks agree.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

QUESTION_TYPES = ("count", "colour", "size", "shape", "yesno", "other")
_TYPE_PREFIXES = (
    ("how many", "count"), ("what color", "colour"), ("what colour", "colour"), ("what size", "size"),
    ("what shape", "shape"), ("is ", "yesno"), ("are ", "yesno"), ("does ", "yesno"), ("do ", "yesno"),
    ("can ", "yesno"), ("has ", "yesno"),
)


def question_type(question: str) -> str:
    """One of QUESTION_TYPES from the question's first words (VQA's usual grouping)."""
    q = question.strip().lower()
    for prefix, kind in _TYPE_PREFIXES:
        if q.startswith(prefix):
            return kind
    return "other"


@dataclass(frozen=True)
class PhraseVocab:
    """The words of an object phrase `<size> <colour> <shape>`."""

    sizes: Sequence[str]
    colours: Sequence[str]
    shapes: Sequence[str]

    def pattern(self) -> re.Pattern:
        alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
        return re.compile(rf"\b({alt(self.sizes)}) ({alt(self.colours)}) ({alt(self.shapes)})\b")


def object_phrases(caption: str, vocab: PhraseVocab) -> Counter:
    """`Counter[(size, colour, shape)]` of the object phrases stated in a caption (lower-cased)."""
    return Counter(vocab.pattern().findall(caption.lower()))


def grounding_counts(caption: str, objects: Iterable[tuple[str, str, str]], vocab: PhraseVocab) -> tuple[int, int, int]:
    """`(tp, fp, fn)` of one caption against the scene's `(size, colour, shape)` objects."""
    stated, present = object_phrases(caption, vocab), Counter(objects)
    tp = sum((stated & present).values())
    return tp, sum(stated.values()) - tp, sum(present.values()) - tp


def grounding_f1(counts: Iterable[tuple[int, int, int]]) -> float:
    """F1 of summed `(tp, fp, fn)` counts; 0.0 when there is nothing to score."""
    tp = fp = fn = 0
    for a, b, c in counts:
        tp, fp, fn = tp + a, fp + b, fn + c
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
