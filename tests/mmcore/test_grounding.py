"""Grounding F1 and question types: exact counts on hand-made captions."""

from __future__ import annotations

import pytest

from mmcore.metrics.grounding import (
    PhraseVocab,
    grounding_counts,
    grounding_f1,
    object_phrases,
    question_type,
)

VOCAB = PhraseVocab(("small", "large"), ("red", "blue", "white", "black"), ("circle", "square", "triangle"))
SCENE = [("large", "white", "square"), ("small", "black", "circle"), ("large", "red", "triangle")]


def test_a_caption_naming_every_object_is_fully_grounded() -> None:
    caption = "a large white square , a small black circle and a large red triangle from left to right"
    assert grounding_counts(caption, SCENE, VOCAB) == (3, 0, 0)


def test_a_wrong_colour_costs_a_false_positive_and_a_false_negative() -> None:
    # The example: fluent, and one colour and one shape wrong.
    caption = "a large white triangle on the left and a small red circle on the right"
    assert grounding_counts(caption, SCENE, VOCAB) == (0, 2, 3)
    caption = "a large white square on the left and a small red circle on the right"
    assert grounding_counts(caption, SCENE, VOCAB) == (1, 1, 2)


def test_a_repeated_phrase_matches_one_object_once() -> None:
    caption = "a small black circle and a small black circle"
    assert grounding_counts(caption, [("small", "black", "circle")], VOCAB) == (1, 1, 0)
    assert object_phrases("A Small Black Circle", VOCAB) == {("small", "black", "circle"): 1}


def test_f1_sums_counts_over_captions() -> None:
    assert grounding_f1([(3, 0, 0), (0, 2, 3)]) == pytest.approx(6 / (6 + 2 + 3))
    assert grounding_f1([]) == 0.0


@pytest.mark.parametrize(
    ("question", "kind"),
    [("how many shapes are there?", "count"), ("what color is the square?", "colour"),
     ("What size is the red circle?", "size"), ("what shape is on the left?", "shape"),
     ("is there a orange circle?", "yesno"), ("where is the cat?", "other")],
)
def test_question_types(question: str, kind: str) -> None:
    assert question_type(question) == kind
