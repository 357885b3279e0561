"""Evaluation metrics: retrieval recall@K, BLEU-4 and CIDEr-D (COCO caption evaluation), VQA accuracy.

Corpus metrics come with per-sample variants for bootstrapping: `retrieval_ranks` +
`recall_from_ranks`, `bleu4_stats` + `bleu4_from_stats`, `cider_d_scores`, `vqa_scores`.
"""

from mmcore.metrics.bleu import bleu4, bleu4_from_stats, bleu4_stats
from mmcore.metrics.cider import cider_d, cider_d_scores
from mmcore.metrics.ptb_tokenize import ptb_tokenize
from mmcore.metrics.retrieval import recall_from_ranks, retrieval_ranks, retrieval_recall
from mmcore.metrics.vqa import normalize_answer, vqa_accuracy, vqa_scores

__all__ = [
    "bleu4", "bleu4_from_stats", "bleu4_stats", "cider_d", "cider_d_scores", "normalize_answer",
    "ptb_tokenize", "recall_from_ranks", "retrieval_ranks", "retrieval_recall", "vqa_accuracy", "vqa_scores",
]
