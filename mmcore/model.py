"""FusionModel: image encoder + text encoder + fusion + decoder + heads, its config and presets.

Tasks of `forward(batch, task)`:
- `pretrain`: ITC embeddings, ITM on positives and hard negatives, captioning LM.
- `retrieval`: ITC embeddings and ITM (no LM).
- `caption`: LM over the caption, the decoder cross-attending to the image tokens.
- `vqa`: the question is encoded and fused with the image; the decoder generates the answer
  cross-attending to [fused question tokens; image tokens]. A batch may ask several questions of
  one image (`question_image`): the image is encoded once.
With an audio encoder (`cfg.audio`; None builds an image-text model whose parameters and
checkpoints are those of a model without audio):
- `asr`: the decoder transcribes the spoken primary caption, cross-attending to the audio tokens.
- `audio_retrieval`: audio-text contrastive embeddings (pooled audio vs the transcript's text).
- `spoken_vqa`: the spoken question's audio tokens are fused with the image, as a typed question is;
  the decoder generates the answer cross-attending to [fused question tokens; image tokens].
- `audio_caption`: audio-conditioned captioning. The spoken description's audio tokens are fused
  with the image the same way, and the decoder writes the caption it speaks (the primary caption),
  cross-attending to [fused audio tokens; image tokens].
Everything that needs gradients (ITM hard negatives included) happens inside forward, so that a
DDP-wrapped model works unchanged. Tasks other than `pretrain` leave some parameters unused, so
a DDP wrapper needs `find_unused_parameters=True` for them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmcore.decoders import DecoderConfig, TextDecoder, beam_search, greedy_search
from mmcore.encoders import (
    AudioEncoder,
    AudioEncoderConfig,
    ImageEncoder,
    ImageEncoderConfig,
    TextEncoder,
    TextEncoderConfig,
    audio_encoder_config,
)
from mmcore.encoders.text import text_config_from_pretrained
from mmcore.fusion import FusionConfig, build_fusion, join_modalities
from mmcore.heads import FusionHeads
from mmcore.overrides import flatten_overrides
from mmcore.tasks import AUDIO_TASKS, TASKS

PRESETS = ("debug", "small", "base", "large")


@dataclass
class FusionModelConfig:
    """Everything needed to rebuild a FusionModel; the model width D is `text.hidden_size`."""

    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    audio: AudioEncoderConfig | None = None  # None: no audio encoder (an image-text model)
    embed_dim: int = 128  # joint ITC embedding size E
    init_temperature: float = 0.07
    # Word-region alignment (FILIP, Yao et al. 2021): project every image patch and caption token
    # into the joint space too, for the token-level contrastive loss (`train.token_itc_weight`).
    token_embed: bool = False
    # VQA: the decoder also reads the question as a prefix of its answer (`[CLS] question [SEP]
    # [CLS] answer`), so that what it learnt from captions about finding a named object serves the
    # answer too; the fused question tokens stay in its memory.
    question_prefix: bool = False
    # Where the ITM head reads the fused text. "cls": the fused [CLS] state, as in ALBEF. "tokens":
    # every fused token's own verdict, pooled by learned weights. In a fusion layer the text attends
    # to itself before it attends to the image, so with one layer [CLS] only sees the image through
    # its own query and cannot check each phrase of the caption (bench/results/learning-2026-12-03-c.md);
    # each token, which has read its phrase, can.
    itm_pool: str = "cls"
    # How many of the cross-attention fusion's layers ITM reads (0: all). With two layers the
    # second one mixes the tokens' verdicts again before the head pools them; ITM on the first
    # layer alone (its own final LayerNorm shared) keeps each token's reading of its own phrase,
    # and costs one layer instead of two on the 3B + B' pairs. Cross-attention fusion only.
    itm_layers: int = 0
    # ITM's loss does not reach the image encoder (its image tokens are detached): the encoder
    # learns from the other tasks, ITM learns to read what they taught it. With itm_layers=1, ITM
    # rose and grounding fell, as if ITM's gradient pulled the encoder away from what captioning
    # needs (bench/results/learning-2026-12-03-e.md).
    itm_detach_image: bool = False
    # ITM also weighs what the caption decoder thinks of the text: the mean and the lowest
    # log-probability of its tokens, teacher-forced on the image (no gradient; a learned weight of
    # each, added to the head's logit). The decoder must name every word of a caption from the image,
    # so a caption with one wrong colour or shape has one unlikely token. On the kept runs of the
    # default recipe these two numbers alone separated evaluation's positives from its hardest
    # negatives 0.95-0.98 of the time, the ITM head 0.77-0.87 (bench/results/learning-2026-12-04.md).
    # Trained with the model it lifts ITM to 0.92-0.95 at seeds 0-2 but grounding F1 fell at two
    # seeds of three, so the recipes leave it off.
    itm_lm: bool = False
    # ITM's score is a logistic regression on three numbers: the head's logit and the caption
    # decoder's mean and lowest token log-probability (as `itm_lm`), with weights fitted after
    # training on the validation split's matching pairs (`pipelines.evaluate.calibrate`). Training
    # is untouched, so every other metric is the same model's. The weights live in a buffer
    # (`heads.itm_calibration`: head, mean, lowest, bias), identity on the head until fitted. On
    # the kept runs of the default recipe at seeds 0-2, fitted on validation, test ITM 0.72 / 0.77
    # / 0.85 -> 0.98 / 0.97 / 0.94 (bench/results/learning-2026-12-04.md).
    itm_calibration: bool = False
    # Hybrid CTC/attention speech recognition (Watanabe et al. 2017): a CTC head on the audio tokens
    # (the vocabulary plus a blank) beside the decoder, for `asr` (`train.ctc_weight`). CTC's
    # monotonic alignment is learnt from far fewer steps than cross-attention's. Needs `audio`.
    asr_ctc: bool = False
    # Spoken VQA: the decoder reads an empty question, `[CLS] [SEP]`, before `[CLS] answer`, a task
    # prompt (as Whisper's task tokens tell its one decoder what to write). Without it, the same
    # audio-and-image memory serves answers and audio captions, and answers come out as captions.
    # With question_prefix it is the answer's place after a typed question. Needs `audio`.
    spoken_answer_prompt: bool = False
    # Special token ids (the tokenizer's [PAD], [CLS] = BOS, [SEP] = EOS).
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    preset: str = "custom"

    @property
    def dim(self) -> int:
        return self.text.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionModelConfig:
        """Inverse of to_dict; an unknown key raises ValueError naming it."""
        parts = {"image": ImageEncoderConfig, "text": TextEncoderConfig,
                 "fusion": FusionConfig, "decoder": DecoderConfig, "audio": AudioEncoderConfig}
        kwargs = {}
        for key, value in d.items():
            if key in parts and value is not None:
                kwargs[key] = _make(parts[key], value, key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown model config key {key!r}")
        return cls(**kwargs)


def _make(kind, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(kind)}
    bad = sorted(set(values) - names)
    if bad:
        raise ValueError(f"unknown model config key(s) {', '.join(where + '.' + b for b in bad)}")
    return kind(**values)


def _preset(name: str) -> FusionModelConfig:
    if name == "debug":
        # Trains on a CPU in minutes: a 96 px ViT whose 16 px patches come from a 4-layer conv stem
        # (37 tokens, each patch about one object wide) with a fixed 2-D sine-cosine position table,
        # 2-layer BERT, width 128; the decoder reads a VQA question before its answer. Against 64 px /
        # 8 px patches with a learned position table, it names shapes and places far sooner; see
        # bench/results/learning-2026-12-02-c.md.
        return FusionModelConfig(
            image=ImageEncoderConfig("vit", 96, 16, num_layers=2, num_heads=4, hidden_dim=128, mlp_dim=256,
                                     stem="conv", pos_embed="sincos"),
            text=TextEncoderConfig(1000, 128, 2, 4, 256, max_positions=64),
            fusion=FusionConfig("cross_attention", num_layers=1, num_heads=4, mlp_ratio=2),
            decoder=DecoderConfig(num_layers=2, num_heads=4, mlp_ratio=2, max_len=64),
            embed_dim=128, token_embed=True, question_prefix=True, itm_pool="tokens", preset="debug",
        )
    if name == "small":
        return FusionModelConfig(
            image=ImageEncoderConfig("vit", 128, 16, 6, 6, 384, 1536, dropout=0.1),
            text=TextEncoderConfig(8000, 384, 4, 6, 1536, max_positions=128, dropout=0.1),
            fusion=FusionConfig("cross_attention", 2, 6, 4, dropout=0.1),
            decoder=DecoderConfig(4, 6, 4, max_len=128, dropout=0.1),
            embed_dim=256, preset="small",
        )
    if name == "base":
        # ViT-B/16 (or resnet50 via image_encoder=) with BERT-base sizes; 6 fusion layers as in ALBEF.
        return FusionModelConfig(
            image=ImageEncoderConfig("vit", 224, 16, 12, 12, 768, 3072, dropout=0.1),
            text=TextEncoderConfig(30522, 768, 12, 12, 3072, max_positions=512, dropout=0.1),
            fusion=FusionConfig("cross_attention", 6, 12, 4, dropout=0.1),
            decoder=DecoderConfig(6, 12, 4, max_len=128, dropout=0.1),
            embed_dim=256, preset="base",
        )
    if name == "large":
        # ViT-L/16 with BERT-large sizes (24 layers each, width 1024), 12 fusion and 12 decoder
        # layers: about 1.1B parameters. Too big for DDP on most GPUs once the optimiser state is
        # counted (~18 GB in fp32 Adam): train it with scaling.strategy=fsdp.
        return FusionModelConfig(
            image=ImageEncoderConfig("vit", 224, 16, 24, 16, 1024, 4096, dropout=0.1),
            text=TextEncoderConfig(30522, 1024, 24, 16, 4096, max_positions=512, dropout=0.1),
            fusion=FusionConfig("cross_attention", 12, 16, 4, dropout=0.1),
            decoder=DecoderConfig(12, 16, 4, max_len=128, dropout=0.1),
            embed_dim=256, preset="large",
        )
    raise ValueError(f"unknown model preset {name!r}; use {', '.join(PRESETS)}")


# Short override names used by the YAML config's model section.
_ALIASES = {
    "vocab_size": "text.vocab_size", "image_size": "image.image_size", "fusion": "fusion.kind",
    "image_encoder": "image.arch", "image_pretrained": "image.pretrained",
    "text_pretrained": "text.pretrained",
}


def model_config(preset: str = "debug", audio_encoder: str | None = None, **overrides: Any) -> FusionModelConfig:
    """The preset's config with overrides applied. Keys are fields (`embed_dim=64`), dotted paths
    into a part (`**{"decoder.num_layers": 3}`, `"audio.num_layers"` once there is an audio
    encoder) or aliases (`vocab_size`, `image_size`, `fusion`, `image_encoder`, `image_pretrained`,
    `text_pretrained`). None values are ignored. `audio_encoder` names an audio preset (`debug` |
    `small` | `base`, `mmcore.encoders.audio`) to add; None keeps the preset's (none)."""
    cfg = _preset(preset)
    if audio_encoder is not None:
        cfg.audio = audio_encoder_config(audio_encoder)
    for key, value in flatten_overrides(overrides).items():
        if value is None:
            continue
        path = _ALIASES.get(key, key).split(".")
        if path[0] == "audio" and len(path) > 1 and cfg.audio is None:
            raise ValueError(f"model override {key!r}: the model has no audio encoder; name an audio preset "
                             "first (model_config(audio_encoder=...), model.audio_encoder in the YAML config)")
        target = cfg
        for part in path[:-1]:
            target = getattr(target, part, None)
        if target is None or not hasattr(target, path[-1]) or isinstance(getattr(target, path[-1]), property):
            raise ValueError(f"unknown model override {key!r}; see mmcore.model.FusionModelConfig")
        setattr(target, path[-1], value)
    return cfg


@dataclass
class FusionOutput:
    """What forward returns; fields a task does not compute are None.

    image_emb, text_emb `(B, E)` L2-normalised; logit_scale scalar (1/T);
    itm_logits, itm_labels `(3B + B',)` (positives, image->hard-negative text, text->hard-negative
    image, then the batch's B' one-word-edited captions `edit_neg_ids` if it has them);
    lm_logits `(B, T-1, V)` and lm_labels `(B, T-1)` (-100 = ignore) for the caption / answer /
    transcript. audio_retrieval: audio_emb and text_emb `(B', E)` of the B' samples that have
    audio (row i of each is one pair), logit_scale the audio-text loss's.
    patch_emb `(B, N, E)`, word_emb `(B, L, E)` L2-normalised and word_mask `(B, L)` (1 = a word:
    not padding, BOS or EOS) and token_scale (its loss's 1/T), for models with `token_embed`, in
    pretrain and retrieval.
    """

    task: str
    image_emb: Tensor | None = None
    text_emb: Tensor | None = None
    logit_scale: Tensor | None = None
    itm_logits: Tensor | None = None
    itm_labels: Tensor | None = None
    # With `itm_lm`: the ITM head's own logits (itm_logits are then head.detach() + the weighted
    # decoder evidence); the loss trains the head on these and the evidence's weights on the sum.
    itm_head_logits: Tensor | None = None
    lm_logits: Tensor | None = None
    lm_labels: Tensor | None = None
    patch_emb: Tensor | None = None
    word_emb: Tensor | None = None
    word_mask: Tensor | None = None
    token_scale: Tensor | None = None
    audio_emb: Tensor | None = None  # (B', E) L2-normalised, audio_retrieval: the samples with audio
    # asr with `cfg.asr_ctc`: log-probabilities `(N, B', V + 1)` over the audio tokens (blank last),
    # targets `(B', S)` and the lengths of both `(B',)`, for the B' samples that have audio.
    ctc_log_probs: Tensor | None = None
    ctc_targets: Tensor | None = None
    ctc_input_lengths: Tensor | None = None
    ctc_target_lengths: Tensor | None = None


class FusionModel(nn.Module):
    """Built from parts: `FusionModel(image_encoder, text_encoder, fusion, decoder, heads, cfg,
    audio_encoder=None)`."""

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, fusion: nn.Module,
                 decoder: TextDecoder, heads: FusionHeads, cfg: FusionModelConfig,
                 audio_encoder: AudioEncoder | None = None):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        if audio_encoder is not None:  # registered only when present: no new state-dict keys otherwise
            self.audio_encoder = audio_encoder
            if cfg.asr_ctc:  # the vocabulary, then CTC's blank
                self.ctc_head = nn.Linear(cfg.dim, cfg.vocab_size + 1)
        self.fusion, self.decoder, self.heads = fusion, decoder, heads
        self.cfg = cfg

    # ---- inference API -------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images `(B, 3, H, W)` -> `(tokens (B, N, D), emb (B, E) L2-normalised)`."""
        tokens, pooled = self.image_encoder(images)
        return tokens, self.heads.embed_image(pooled)

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """ids, mask `(B, L)` -> `(tokens (B, L, D), emb (B, E) L2-normalised)`."""
        tokens, pooled = self.text_encoder(ids, mask)
        return tokens, self.heads.embed_text(pooled)

    def itm_logits(self, image_tokens: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Matching logit `(B,)` of image tokens `(B, N, D)` with texts `(B, L)` (> 0: match)."""
        text_tokens, _ = self.text_encoder(ids, mask)
        return self._match(text_tokens, ids, mask, image_tokens)

    def _match(self, text_tokens: Tensor, ids: Tensor, mask: Tensor, image_tokens: Tensor,
               out: FusionOutput | None = None, calibrated: bool = True) -> Tensor:
        """ITM logits `(B,)` of text tokens `(B, L, D)` fused with image tokens `(B, N, D)`,
        through the first `cfg.itm_layers` fusion layers (all when 0). With `cfg.itm_lm`, plus the
        weighted caption-decoder evidence of `caption_evidence`; in training (`out` given) the
        head's own logits are appended to `out.itm_head_logits` and the sum returned holds them
        detached, so that the head learns exactly as it would alone and the sum's loss trains only
        the evidence's weights. With `cfg.itm_calibration`, outside training and when `calibrated`,
        the fitted logistic regression of `itm_features` instead."""
        depth = {"depth": self.cfg.itm_layers} if self.cfg.itm_layers else {}
        if self.cfg.itm_detach_image:
            image_tokens = image_tokens.detach()
        head = self.heads.match(self.fusion(text_tokens, mask, image_tokens, **depth), mask)
        if self.cfg.itm_lm:
            evidence = self.heads.itm_lm(self.caption_evidence(ids, mask, image_tokens)).squeeze(-1)
            if out is not None:
                seen = out.itm_head_logits
                out.itm_head_logits = head if seen is None else torch.cat([seen, head])
                return head.detach() + evidence
            head = head + evidence
        if out is None and calibrated and self.cfg.itm_calibration:
            w = self.heads.itm_calibration
            features = torch.cat([head.float()[:, None], self.caption_evidence(ids, mask, image_tokens)], dim=-1)
            return features @ w[:3].float() + w[3].float()
        return head

    @torch.no_grad()
    def itm_features(self, image_tokens: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """`(B, 3)`: what the calibrated ITM score weighs (`cfg.itm_calibration`): the uncalibrated
        matching logit, and the caption decoder's mean and lowest token log-probability of `ids`."""
        text_tokens, _ = self.text_encoder(ids, mask)
        head = self._match(text_tokens, ids, mask, image_tokens, calibrated=False)
        return torch.cat([head.float()[:, None], self.caption_evidence(ids, mask, image_tokens)], dim=-1)

    @torch.no_grad()
    def caption_evidence(self, ids: Tensor, mask: Tensor, image_tokens: Tensor) -> Tensor:
        """`(B, 2)`: the mean and the lowest log-probability the caption decoder gives the tokens of
        `ids (B, L)` after the first (BOS), teacher-forced on `image_tokens (B, N, D)`. No gradient:
        ITM reads the decoder, it does not train it."""
        logits, labels = self._lm(ids, mask, image_tokens.detach(), None)
        real = labels != -100
        logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        mean = logp.masked_fill(~real, 0.0).sum(-1) / real.sum(-1).clamp(min=1)
        low = logp.masked_fill(~real, 0.0).min(-1).values
        return torch.stack([mean, low], dim=-1)

    @torch.no_grad()
    def generate(self, images: Tensor, max_len: int, num_beams: int = 1,
                 prompt_ids: Tensor | None = None, prompt_mask: Tensor | None = None,
                 use_cache: bool = True) -> Tensor:
        """Captions (or, with a question prompt, answers) `(B, T)`, T <= max_len, without BOS;
        EOS included where generated and PAD after it. Decode with `mmcore.data.decode_text`."""
        if not 1 <= max_len < self.cfg.decoder.max_len:
            raise ValueError(f"max_len must be in [1, {self.cfg.decoder.max_len - 1}] (decoder.max_len - 1), got {max_len}")
        image_tokens, _ = self.image_encoder(images)
        if prompt_ids is None:
            memory, memory_mask = image_tokens, None
        else:
            if prompt_mask is None:
                prompt_mask = (prompt_ids != self.cfg.pad_id).long()
            memory, memory_mask = self._vqa_memory(image_tokens, prompt_ids, prompt_mask)
        c = self.cfg
        prompt = dict(prompt=prompt_ids, prompt_mask=prompt_mask) if prompt_ids is not None and c.question_prefix else {}
        if num_beams <= 1:
            return greedy_search(self.decoder, memory, memory_mask, c.bos_id, c.eos_id, c.pad_id,
                                 max_len, use_cache, **prompt)
        return beam_search(self.decoder, memory, memory_mask, c.bos_id, c.eos_id, c.pad_id,
                           max_len, num_beams, use_cache=use_cache, **prompt)

    @property
    def _patch_start(self) -> int:
        """Index of the first patch among the image tokens: a ViT's class token comes first."""
        return 1 if self.cfg.image.arch == "vit" else 0

    # ---- training forward ----------------------------------------------------------------
    def forward(self, batch: dict[str, Any], task: str) -> FusionOutput:
        """batch: the collated dict from `mmcore.data.collate` (tensors on the model's device)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        if task in AUDIO_TASKS:
            return self._forward_audio(batch, task)
        images = batch["image"]
        if task == "caption":
            image_tokens, _ = self.image_encoder(images)
            logits, labels = self._lm(batch["caption_ids"], batch["caption_mask"], image_tokens, None)
            return FusionOutput(task, lm_logits=logits, lm_labels=labels)
        if task == "vqa":
            return self._forward_vqa(batch)
        ids, mask = batch["caption_ids"], batch["caption_mask"]
        image_tokens, image_pooled = self.image_encoder(images)
        text_tokens, text_pooled = self.text_encoder(ids, mask)
        out = FusionOutput(task, self.heads.embed_image(image_pooled), self.heads.embed_text(text_pooled),
                           self.heads.scale())
        out.itm_logits, out.itm_labels = self._itm(image_tokens, text_tokens, ids, mask, out)
        if "edit_neg_ids" in batch:
            edit_ids, edit_mask = batch["edit_neg_ids"], batch["edit_neg_mask"]
            edit_tokens, _ = self.text_encoder(edit_ids, edit_mask)
            logits = self._match(edit_tokens, edit_ids, edit_mask, image_tokens[batch["edit_neg_image"]], out)
            out.itm_logits = torch.cat([out.itm_logits, logits])
            out.itm_labels = torch.cat([out.itm_labels, torch.zeros_like(logits)])
        if self.heads.token_embed:
            out.patch_emb, out.word_emb = self.heads.embed_tokens(image_tokens[:, self._patch_start:], text_tokens)
            out.word_mask = mask.bool() & (ids != self.cfg.bos_id) & (ids != self.cfg.eos_id)
            out.token_scale = self.heads.token_scale()
        if task == "pretrain":
            out.lm_logits, out.lm_labels = self._lm(ids, mask, image_tokens, None)
        return out

    def _forward_vqa(self, batch: dict[str, Any]) -> FusionOutput:
        image_tokens, _ = self.image_encoder(batch["image"])
        if "question_image" in batch:  # several questions per image: each row asks about one image
            image_tokens = image_tokens[batch["question_image"]]
        q_ids, q_mask = batch["question_ids"], batch["question_mask"]
        memory, memory_mask = self._vqa_memory(image_tokens, q_ids, q_mask)
        if self.cfg.question_prefix:
            logits, labels = self._prefixed_lm(q_ids, q_mask, batch["answer_ids"], batch["answer_mask"],
                                               memory, memory_mask)
        else:
            logits, labels = self._lm(batch["answer_ids"], batch["answer_mask"], memory, memory_mask)
        # Samples without a question-answer pair contribute nothing.
        labels = labels.masked_fill(~batch["has_qa"].bool()[:, None], -100)
        return FusionOutput("vqa", lm_logits=logits, lm_labels=labels)

    def _vqa_memory(self, image_tokens: Tensor, q_ids: Tensor, q_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder memory for VQA: fused question tokens then image tokens `(B, Lq + N, D)`, and its mask."""
        q_tokens, _ = self.text_encoder(q_ids, q_mask)
        fused = self.fusion(q_tokens, q_mask, image_tokens)
        ones = torch.ones(image_tokens.shape[:2], dtype=q_mask.dtype, device=q_mask.device)
        return torch.cat([fused, image_tokens], dim=1), torch.cat([q_mask, ones], dim=1)

    def _lm(self, ids: Tensor, mask: Tensor, memory: Tensor, memory_mask: Tensor | None):
        """Teacher-forced logits `(B, T-1, V)` predicting ids[:, 1:] from ids[:, :-1]; labels -100 on padding."""
        logits = self.decoder(ids[:, :-1], memory, memory_mask)
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return logits, labels

    def _prefixed_lm(self, q_ids, q_mask, ids, mask, memory, memory_mask):
        """Like `_lm` for the answer `ids (B, T)`, with the question `(B, Lq)` (right-padded) read
        first: logits `(B, T-1, V)` and labels for the answer tokens only."""
        full, full_mask = torch.cat([q_ids, ids], dim=1), torch.cat([q_mask, mask], dim=1)
        logits = self.decoder(full[:, :-1], memory, memory_mask, pad_mask=full_mask[:, :-1])
        lq = q_ids.shape[1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return logits[:, lq:], labels

    def _itm(self, image_tokens, text_tokens, ids, mask, out: FusionOutput):
        """ITM logits/labels `(3B,)`: matched pairs, then each image with a hard-negative text and each
        text with a hard-negative image, sampled in proportion to their ITC similarity."""
        b = ids.shape[0]
        if b < 2:  # no negatives to sample
            return self._match(text_tokens, ids, mask, image_tokens, out), torch.ones(b, device=ids.device)
        neg_text, neg_image = _hard_negatives(out.image_emb, out.text_emb, out.logit_scale, ids)
        texts = torch.cat([text_tokens, text_tokens[neg_text], text_tokens])
        all_ids = torch.cat([ids, ids[neg_text], ids])
        masks = torch.cat([mask, mask[neg_text], mask])
        images = torch.cat([image_tokens, image_tokens, image_tokens[neg_image]])
        logits = self._match(texts, all_ids, masks, images, out)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).to(logits.device)
        return logits, labels

    # ---- audio ---------------------------------------------------------------------------
    def _ctc(self, tokens: Tensor, token_mask: Tensor, ids: Tensor, mask: Tensor, out: FusionOutput) -> None:
        """CTC log-probabilities of the audio tokens and the transcripts as CTC targets, on `out`."""
        logits = self.ctc_head(tokens).float()
        out.ctc_log_probs = logits.log_softmax(dim=-1).transpose(0, 1)  # (N, B', V + 1)
        out.ctc_targets, out.ctc_target_lengths = _ctc_targets(ids, mask, self.cfg.bos_id, self.cfg.eos_id)
        out.ctc_input_lengths = token_mask.sum(dim=1)

    def _audio(self) -> AudioEncoder:
        if not hasattr(self, "audio_encoder"):
            raise ValueError("this model has no audio encoder (model config `audio` is None); build it with "
                             "one (e.g. model.audio_encoder: debug in the YAML config) for audio tasks")
        return self.audio_encoder

    def encode_audio(self, waveform: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """waveform `(B, T)` at `cfg.audio.sample_rate`, lengths `(B,)` -> `(tokens (B, N, D), mask
        (B, N) bool, emb (B, E) L2-normalised)`."""
        enc = self._audio()(waveform, lengths)
        return enc.tokens, enc.mask, self.heads.embed_audio(enc.pooled)

    @torch.no_grad()
    def transcribe(self, waveform: Tensor, lengths: Tensor | None, max_len: int, num_beams: int = 1) -> Tensor:
        """Transcripts `(B, T)` of `(B, T_audio)` speech, as `generate` returns captions."""
        enc = self._audio()(waveform, lengths)
        return self._search(enc.tokens, enc.mask.long(), max_len, num_beams)

    @torch.no_grad()
    def transcript_log_likelihood(self, audio_tokens: Tensor, audio_mask: Tensor, ids: Tensor,
                                  mask: Tensor) -> Tensor:
        """log p(text | clip) `(B,)`: the decoder's summed log-probabilities of each transcript's
        tokens `ids (B, L)` (BOS ... EOS, right-padded; `mask (B, L)`) given a clip's audio tokens
        `(B, N, D)` and their mask `(B, N)` (`encode_audio`): how well the clip explains the text,
        the score that re-ranks audio-text retrieval."""
        logits, labels = self._lm(ids, mask, audio_tokens, audio_mask.long())
        logp = logits.float().log_softmax(dim=-1)
        keep = labels != -100
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * keep).sum(dim=1)

    @torch.no_grad()
    def answer_spoken(self, images: Tensor, q_audio: Tensor, q_lengths: Tensor | None, max_len: int,
                      num_beams: int = 1) -> Tensor:
        """Answers `(B, T)` to spoken questions `(B, T_audio)` about images `(B, 3, H, W)`."""
        image_tokens, _ = self.image_encoder(images)
        memory, memory_mask = self._audio_image_memory(image_tokens, q_audio, q_lengths)
        return self._search(memory, memory_mask, max_len, num_beams, self._answer_prompt(len(images), images.device))

    @torch.no_grad()
    def caption_with_audio(self, images: Tensor, waveform: Tensor, lengths: Tensor | None, max_len: int,
                           num_beams: int = 1) -> Tensor:
        """Captions `(B, T)` of images `(B, 3, H, W)` conditioned on a spoken description of each
        `(B, T_audio)` (the `audio_caption` task)."""
        image_tokens, _ = self.image_encoder(images)
        memory, memory_mask = self._audio_image_memory(image_tokens, waveform, lengths)
        return self._search(memory, memory_mask, max_len, num_beams)

    def _search(self, memory: Tensor, memory_mask: Tensor | None, max_len: int, num_beams: int,
                prompt: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if not 1 <= max_len < self.cfg.decoder.max_len:
            raise ValueError(f"max_len must be in [1, {self.cfg.decoder.max_len - 1}] (decoder.max_len - 1), got {max_len}")
        c = self.cfg
        kw = {} if prompt is None else dict(prompt=prompt[0], prompt_mask=prompt[1])
        if num_beams <= 1:
            return greedy_search(self.decoder, memory, memory_mask, c.bos_id, c.eos_id, c.pad_id, max_len, **kw)
        return beam_search(self.decoder, memory, memory_mask, c.bos_id, c.eos_id, c.pad_id, max_len, num_beams, **kw)

    def _answer_prompt(self, batch: int, device) -> tuple[Tensor, Tensor] | None:
        """The spoken-answer task prompt `([CLS] [SEP]` ids, mask), `(B, 2)` each, or None when
        `cfg.spoken_answer_prompt` is off."""
        if not self.cfg.spoken_answer_prompt:
            return None
        ids = torch.tensor([self.cfg.bos_id, self.cfg.eos_id], device=device).expand(batch, 2)
        return ids, torch.ones_like(ids)

    def _audio_image_memory(self, image_tokens: Tensor, audio: Tensor, lengths: Tensor | None):
        """Decoder memory for spoken VQA and audio captioning: the clip's audio tokens fused with the
        image, then the image tokens `(B, Na + N, D)`, and its mask `(B, Na + N)`."""
        q = self._audio()(audio, lengths)
        fused = self.fusion(q.tokens, q.mask, image_tokens)
        memory, mask = join_modalities([(fused, q.mask), (image_tokens, None)])
        return memory, mask.long()

    def _forward_audio(self, batch: dict[str, Any], task: str) -> FusionOutput:
        """The audio tasks (module docstring). Samples without the audio a task needs contribute
        nothing: their labels are -100, or (audio_retrieval) their rows are left out."""
        self._audio()
        if task == "spoken_vqa":
            image_tokens, _ = self.image_encoder(batch["image"])
            memory, memory_mask = self._audio_image_memory(image_tokens, batch["question_audio"],
                                                          batch["question_audio_lengths"])
            # The spoken question is each sample's first QA pair: the first B question rows.
            b = image_tokens.shape[0]
            ids, mask = batch["answer_ids"][:b], batch["answer_mask"][:b]
            prompt = self._answer_prompt(b, ids.device)
            if prompt is None:
                logits, labels = self._lm(ids, mask, memory, memory_mask)
            else:
                logits, labels = self._prefixed_lm(*prompt, ids, mask, memory, memory_mask)
            keep = batch["has_qa"][:b].bool() & batch["has_question_audio"].bool()
            return FusionOutput(task, lm_logits=logits, lm_labels=labels.masked_fill(~keep[:, None], -100))
        ids, mask = batch["transcript_ids"], batch["transcript_mask"]
        has = batch["has_audio"].bool()
        if task == "audio_caption":
            image_tokens, _ = self.image_encoder(batch["image"])
            memory, memory_mask = self._audio_image_memory(image_tokens, batch["audio"], batch["audio_lengths"])
            logits, labels = self._lm(ids, mask, memory, memory_mask)
            return FusionOutput(task, lm_logits=logits, lm_labels=labels.masked_fill(~has[:, None], -100))
        enc = self._audio()(batch["audio"], batch["audio_lengths"])
        if task == "asr":
            logits, labels = self._lm(ids, mask, enc.tokens, enc.mask.long())
            out = FusionOutput(task, lm_logits=logits, lm_labels=labels.masked_fill(~has[:, None], -100))
            if hasattr(self, "ctc_head"):
                self._ctc(enc.tokens[has], enc.mask[has], ids[has], mask[has], out)
            return out
        _, text_pooled = self.text_encoder(ids, mask)
        return FusionOutput(task, text_emb=self.heads.embed_text(text_pooled)[has],
                            audio_emb=self.heads.embed_audio(enc.pooled)[has], logit_scale=self.heads.audio_scale())


def _ctc_targets(ids: Tensor, mask: Tensor, bos_id: int, eos_id: int) -> tuple[Tensor, Tensor]:
    """The transcript's tokens without BOS, EOS and padding, left-aligned `(B, S)`, and lengths `(B,)`."""
    keep = mask.bool() & (ids != bos_id) & (ids != eos_id)
    lengths = keep.sum(dim=1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept tokens first, in order
    return torch.gather(ids, 1, order) * (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]), lengths


@torch.no_grad()
def _hard_negatives(image_emb: Tensor, text_emb: Tensor, scale: Tensor, ids: Tensor):
    """Indices `(B,)` of a negative text per image and a negative image per text, drawn with
    probability softmax(similarity). Pairs whose captions are identical are never negatives
    (a repeated caption would be a false negative) unless nothing else is left."""
    sim = scale * image_emb @ text_emb.T  # (B, B)
    same = (ids[:, None, :] == ids[None, :, :]).all(-1)
    w_i2t = torch.softmax(sim.float(), dim=1).masked_fill(same, 0)
    w_t2i = torch.softmax(sim.T.float(), dim=1).masked_fill(same, 0)
    # Fallback for rows whose every other caption is identical: any other index.
    eye = torch.eye(len(ids), dtype=torch.bool, device=ids.device)
    floor = (~eye).float() * 1e-8
    return torch.multinomial(w_i2t + floor, 1).squeeze(1), torch.multinomial(w_t2i + floor, 1).squeeze(1)


def build_model(cfg: FusionModelConfig, load_pretrained: bool = True) -> FusionModel:
    """Build the model the config describes; with load_pretrained, read the local pretrained weights
    it names (a BERT dir also fixes the text sizes, which are written back into `model.cfg`)."""
    cfg = dataclasses.replace(cfg)
    if load_pretrained and cfg.text.pretrained:
        wanted = cfg.text.vocab_size
        cfg.text = text_config_from_pretrained(cfg.text.pretrained, cfg.text)
        if wanted > cfg.text.vocab_size:
            raise ValueError(
                f"the tokenizer has {wanted} tokens but the BERT in {cfg.text.pretrained} knows only "
                f"{cfg.text.vocab_size}; use that directory's own tokenizer (model.tokenizer)"
            )
    if cfg.itm_layers and (cfg.fusion.kind != "cross_attention" or not 1 <= cfg.itm_layers <= cfg.fusion.num_layers):
        raise ValueError(f"itm_layers {cfg.itm_layers} needs cross_attention fusion with at least that many layers "
                         f"(fusion: {cfg.fusion.kind}, {cfg.fusion.num_layers} layer(s)); use 0 for all of them")
    if cfg.decoder.num_heads and cfg.dim % cfg.decoder.num_heads:
        raise ValueError(f"model width {cfg.dim} is not divisible by decoder.num_heads {cfg.decoder.num_heads}")
    model = FusionModel(
        ImageEncoder(cfg.image, cfg.dim),
        TextEncoder(cfg.text),
        build_fusion(cfg.fusion, cfg.dim),
        TextDecoder(cfg.decoder, cfg.dim, cfg.vocab_size),
        FusionHeads(cfg.dim, cfg.embed_dim, cfg.init_temperature, cfg.token_embed, audio=cfg.audio is not None,
                    itm_pool=cfg.itm_pool, itm_lm=cfg.itm_lm,
                    itm_calibration=cfg.itm_calibration),
        cfg,
        audio_encoder=AudioEncoder(cfg.audio, cfg.dim) if cfg.audio is not None else None,
    )
    if load_pretrained and cfg.image.pretrained:
        model.image_encoder.load_pretrained(cfg.image.pretrained)
    if load_pretrained and cfg.text.pretrained:
        model.text_encoder.load_pretrained(cfg.text.pretrained)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
