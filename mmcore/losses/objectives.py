"""Task losses over a FusionOutput; each returns `dict[str, Tensor]` with the total under "loss"."""

from __future__ import annotations

import inspect

from torch import Tensor, nn
from torch.nn import functional as F

from mmcore.losses.itc import ContrastiveLoss, GatherFn, WordRegionLoss
from mmcore.losses.itm import MatchingLoss
from mmcore.losses.lm import LanguageModelLoss


def _require(output, *names: str) -> None:
    missing = [n for n in names if getattr(output, n) is None]
    if missing:
        raise ValueError(f"model output of task {output.task!r} lacks {missing}; run forward with the matching task")


def _word_region(loss: WordRegionLoss, output) -> Tensor:
    return loss(output.patch_emb, output.word_emb, output.word_mask, output.token_scale)


class RetrievalLoss(nn.Module):
    """ITC + ITM (+ the word-region loss, for models with `token_embed`), weighted. Keys: loss,
    itc, itm (, token_itc). The word-region part is computed even at weight 0, so that DDP sees its
    parameters used."""

    def __init__(self, itc_weight: float = 1.0, itm_weight: float = 1.0, token_itc_weight: float = 1.0,
                 gather_fn: GatherFn | None = None):
        super().__init__()
        self.weights = {"itc": itc_weight, "itm": itm_weight, "token_itc": token_itc_weight}
        self.itc, self.itm = ContrastiveLoss(gather_fn), MatchingLoss()
        self.token_itc = WordRegionLoss(gather_fn)

    def parts(self, output) -> dict[str, Tensor]:
        _require(output, "image_emb", "text_emb", "itm_logits")
        parts = {
            "itc": self.itc(output.image_emb, output.text_emb, output.logit_scale),
            "itm": self.itm(output.itm_logits, output.itm_labels),
        }
        if output.itm_head_logits is not None:  # itm_lm: the head alone, and the sum (head detached)
            parts["itm"] = parts["itm"] + self.itm(output.itm_head_logits, output.itm_labels)
        if output.patch_emb is not None:
            parts["token_itc"] = _word_region(self.token_itc, output)
        return parts

    def forward(self, output) -> dict[str, Tensor]:
        parts = self.parts(output)
        return {"loss": sum(self.weights[k] * v for k, v in parts.items()), **parts}


class PretrainLoss(RetrievalLoss):
    """ITC + ITM + LM (+ the word-region loss, for models with `token_embed`), weighted. Keys:
    loss, itc, itm, lm (, token_itc)."""

    def __init__(self, itc_weight: float = 1.0, itm_weight: float = 1.0, lm_weight: float = 1.0,
                 label_smoothing: float = 0.1, token_itc_weight: float = 1.0, gather_fn: GatherFn | None = None):
        super().__init__(itc_weight, itm_weight, token_itc_weight, gather_fn)
        self.weights["lm"] = lm_weight
        self.lm = LanguageModelLoss(label_smoothing)

    def parts(self, output) -> dict[str, Tensor]:
        _require(output, "lm_logits")
        return {**super().parts(output), "lm": self.lm(output.lm_logits, output.lm_labels)}


class CaptionLoss(nn.Module):
    """Captioning LM loss with label smoothing. Keys: loss, lm."""

    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.lm = LanguageModelLoss(label_smoothing)

    def forward(self, output) -> dict[str, Tensor]:
        _require(output, "lm_logits")
        lm = self.lm(output.lm_logits, output.lm_labels)
        return {"loss": lm, "lm": lm}


class SpeechRecognitionLoss(nn.Module):
    """The transcript's LM loss, plus `ctc_weight` x CTC over the audio tokens for a model with a
    CTC head (`asr_ctc`; hybrid CTC/attention). Keys: loss, lm (, ctc)."""

    def __init__(self, label_smoothing: float = 0.1, ctc_weight: float = 0.3):
        super().__init__()
        self.lm, self.ctc_weight = LanguageModelLoss(label_smoothing), ctc_weight

    def forward(self, output) -> dict[str, Tensor]:
        _require(output, "lm_logits")
        lm = self.lm(output.lm_logits, output.lm_labels)
        if output.ctc_log_probs is None:
            return {"loss": lm, "lm": lm}
        blank = output.ctc_log_probs.shape[-1] - 1
        if output.ctc_targets.shape[0] == 0:  # no sample of the batch has audio
            ctc = output.ctc_log_probs.sum() * 0.0
        else:
            ctc = F.ctc_loss(output.ctc_log_probs, output.ctc_targets, output.ctc_input_lengths,
                             output.ctc_target_lengths, blank=blank, zero_infinity=True)
        return {"loss": lm + self.ctc_weight * ctc, "lm": lm, "ctc": ctc}


class VQALoss(nn.Module):
    """Answer-generation loss (LM over the answer tokens of samples that have a QA pair). Keys: loss, vqa."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.lm = LanguageModelLoss(label_smoothing)

    def forward(self, output) -> dict[str, Tensor]:
        _require(output, "lm_logits")
        vqa = self.lm(output.lm_logits, output.lm_labels)
        return {"loss": vqa, "vqa": vqa}


class AudioTextLoss(nn.Module):
    """Audio-text contrastive loss (ITC over the audio and transcript embeddings, with the audio
    head's own temperature). Keys: loss, atc."""

    def __init__(self, gather_fn: GatherFn | None = None):
        super().__init__()
        self.atc = ContrastiveLoss(gather_fn)

    def forward(self, output) -> dict[str, Tensor]:
        _require(output, "audio_emb", "text_emb")
        atc = self.atc(output.audio_emb, output.text_emb, output.logit_scale)
        return {"loss": atc, "atc": atc}


LOSSES = {"pretrain": PretrainLoss, "caption": CaptionLoss, "vqa": VQALoss, "retrieval": RetrievalLoss,
          "asr": SpeechRecognitionLoss, "audio_retrieval": AudioTextLoss, "spoken_vqa": VQALoss,
          "audio_caption": CaptionLoss}


def build_loss(task: str, **weights) -> nn.Module:
    """The loss for `task`. Keyword arguments a loss does not take are ignored, so a trainer can pass
    all of `itc_weight, itm_weight, lm_weight, label_smoothing, gather_fn` to any task."""
    if task not in LOSSES:
        raise ValueError(f"unknown task {task!r} for build_loss; use one of {', '.join(LOSSES)}")
    cls = LOSSES[task]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in weights.items() if k in accepted})
