"""Losses: hand-checked ITC, the DDP gather hook, LM masking, ITM hard negatives, build_loss."""

from __future__ import annotations

import math

import pytest
import torch

from mmcore.losses import (
    CaptionLoss,
    ContrastiveLoss,
    LanguageModelLoss,
    VQALoss,
    WordRegionLoss,
    build_loss,
    word_region_similarity,
)
from mmcore.model import FusionOutput, _hard_negatives


def test_itc_hand_checked():
    emb = torch.eye(4)
    assert ContrastiveLoss()(emb, emb, torch.tensor(100.0)) < 1e-6  # perfectly aligned, sharp
    # all similarities equal -> uniform softmax over 4 -> log(4)
    same = torch.ones(4, 3) / math.sqrt(3)
    assert torch.isclose(ContrastiveLoss()(same, same, torch.tensor(10.0)), torch.tensor(math.log(4)))


def test_itc_gather_fn_uses_negatives_from_all_ranks_with_gradients():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    other_img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    other_txt = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    others = {id(img): other_img, id(txt): other_txt}
    # stands in for all_gather across 2 ranks: this rank's rows first, then the other rank's
    gather = lambda t: torch.cat([t, others[id(t)]])  # noqa: E731
    scale = torch.tensor(5.0)
    loss = ContrastiveLoss(gather)(img, txt, scale)
    direct = ContrastiveLoss()(torch.cat([img, other_img]), torch.cat([txt, other_txt]), scale)
    assert torch.isclose(loss, direct)
    assert not torch.isclose(loss, ContrastiveLoss()(img, txt, scale))
    loss.backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_lm_loss_masks_and_smoothing():
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    assert torch.isclose(LanguageModelLoss()(logits, labels), torch.tensor(math.log(5)))
    empty = LanguageModelLoss()(logits, torch.full((2, 3), -100))
    empty.backward()
    assert empty.item() == 0 and logits.grad is not None
    peaked = torch.full((1, 1, 5), -20.0)
    peaked[0, 0, 1] = 20.0
    target = torch.tensor([[1]])
    assert LanguageModelLoss(0.0)(peaked, target) < 1e-6 < LanguageModelLoss(0.1)(peaked, target)


def test_task_losses_and_build_loss():
    out = FusionOutput("caption", lm_logits=torch.zeros(1, 2, 4), lm_labels=torch.tensor([[1, -100]]))
    assert set(CaptionLoss()(out)) == {"loss", "lm"} and set(VQALoss()(out)) == {"loss", "vqa"}
    with pytest.raises(ValueError, match="lacks"):
        build_loss("pretrain")(out)
    loss = build_loss("pretrain", itc_weight=0.5, itm_weight=2.0, lm_weight=0.0, label_smoothing=0.2, gather_fn=None)
    assert loss.weights == {"itc": 0.5, "itm": 2.0, "token_itc": 1.0, "lm": 0.0} and loss.lm.label_smoothing == 0.2
    assert build_loss("vqa", itc_weight=1.0).lm.label_smoothing == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        build_loss("finetune")


def test_hard_negatives_skip_identical_captions():
    torch.manual_seed(0)
    ids = torch.tensor([[2, 5, 3], [2, 5, 3], [2, 6, 3], [2, 7, 3]])  # rows 0 and 1 say the same
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    for _ in range(50):
        neg_t, neg_i = _hard_negatives(emb, emb, torch.tensor(10.0), ids)
        for i in range(4):
            assert not torch.equal(ids[neg_t[i]], ids[i]) and not torch.equal(ids[neg_i[i]], ids[i])


def test_itm_loss_is_class_balanced_so_logit_zero_is_the_boundary():
    from mmcore.losses.itm import MatchingLoss

    labels = torch.tensor([1.0, 0.0, 0.0])  # one positive, two negatives, as the model samples them
    loss = MatchingLoss()
    # Hand-checked: the mean of the positives' mean and the negatives' mean of -log p(label).
    logits = torch.tensor([0.5, -1.0, 2.0])
    pos = -math.log(torch.sigmoid(torch.tensor(0.5)).item())
    neg = (-math.log(1 - torch.sigmoid(torch.tensor(-1.0)).item()) - math.log(1 - torch.sigmoid(torch.tensor(2.0)).item())) / 2
    assert loss(logits, labels).item() == pytest.approx((pos + neg) / 2, rel=1e-5)
    # The best constant logit is 0 (p = 1/2), not the 1:2 prior's log(1/2): a model that cannot
    # tell pairs apart sits at the balanced boundary, and any ranking signal moves both sides.
    best = min((torch.tensor([c] * 3) for c in torch.linspace(-2, 2, 401)), key=lambda c: loss(c, labels).item())
    assert best[0].item() == pytest.approx(0.0, abs=0.011)
    # Only positives (a one-pair batch): their mean alone.
    assert loss(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(2))


def test_word_region_similarity_hand_checked():
    e = torch.eye(3)
    words = torch.stack([e[[0, 1, 2]], e[[2, 2, 2]]])  # caption 0: words 0,1,2; caption 1: word 2 (x3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # caption 0's third word and caption 1's last two are padding
    patches = torch.stack([e[[0, 1]], e[[2, 2]]])  # image 0 shows 0 and 1; image 1 only 2
    sim = word_region_similarity(words, patches, mask)
    # caption 0 (words 0, 1): both found in image 0 -> 1; none in image 1 -> 0. caption 1 (word 2): 0, 1.
    assert torch.equal(sim, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_word_region_loss_rewards_each_word_finding_its_own_patch():
    torch.manual_seed(0)
    vocab = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)  # one direction per "object"
    objects = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 3]])  # what each of 4 images shows
    patches = torch.cat([vocab[objects], torch.zeros(4, 3, 16)], dim=1)  # + 3 empty background patches
    words = vocab[objects]  # each caption names its image's two objects
    mask = torch.ones(4, 2)
    loss, scale = WordRegionLoss(), torch.tensor(20.0)
    right = loss(patches, words, mask, scale)
    wrong = loss(patches, words[[1, 2, 3, 0]], mask, scale)  # captions given to other images
    assert right < 0.2 < math.log(4) < wrong
    # the gather hook sees every rank's patches and words, as ContrastiveLoss's does
    gathered = WordRegionLoss(lambda t: torch.cat([t, t.flip(0)]))(patches[:2], words[:2], mask[:2], scale)
    direct = loss(torch.cat([patches[:2], patches[:2].flip(0)]), torch.cat([words[:2], words[:2].flip(0)]),
                  torch.cat([mask[:2], mask[:2]]), scale)
    assert torch.isclose(gathered, direct)
