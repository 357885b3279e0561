"""The ITM report-card pairs: each image's primary caption and its hardest true negative."""

from __future__ import annotations

import torch

from pipelines.evaluate.ranking import itm_pairs, same_text_as_own


def merged(text_ids, owner, image_emb, text_emb) -> dict:
    return {"text_ids": text_ids, "text_owner": torch.tensor(owner), "image_emb": torch.tensor(image_emb),
            "text_emb": torch.tensor(text_emb)}


def test_hardest_negative_is_never_a_caption_identical_to_the_images_own():
    # Image 0 and image 1 both have the caption [5, 6] ("a red circle"); image 2 has [7].
    m = merged(text_ids=[[5, 6], [5, 6], [8], [7]], owner=[0, 1, 1, 2],
               image_emb=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
               text_emb=[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    images, pos, neg = itm_pairs(m)
    assert images.tolist() == [0, 1, 2] and pos.tolist() == [0, 1, 3]
    # Image 0's most similar other caption is text 1, the same words as its own: skipped for text 3.
    # Image 1 owns [5, 6] itself, so text 0 is no negative for it either; text 3 is next.
    assert neg.tolist() == [3, 3, 2]


def test_same_text_as_own_marks_every_copy():
    owner = torch.tensor([0, 1, 1, 2])
    same = same_text_as_own([[5, 6], [5, 6], [8], [7]], owner, 3)
    assert same.tolist() == [[True, True, False, False], [True, True, True, False], [False, False, False, True]]
