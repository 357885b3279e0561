"""Losses over a FusionOutput: ITC, ITM, LM and the per-task combinations."""

from mmcore.losses.itc import ContrastiveLoss, WordRegionLoss, word_region_similarity
from mmcore.losses.itm import MatchingLoss
from mmcore.losses.lm import LanguageModelLoss
from mmcore.losses.objectives import CaptionLoss, PretrainLoss, RetrievalLoss, VQALoss, build_loss

__all__ = [
    "CaptionLoss", "ContrastiveLoss", "LanguageModelLoss", "MatchingLoss", "PretrainLoss",
    "RetrievalLoss", "VQALoss", "WordRegionLoss", "build_loss", "word_region_similarity",
]
