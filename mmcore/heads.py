"""Task heads on top of the encoders and fusion: ITC projections + temperature, and the ITM classifier."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Calibration weights that score ITM with the head alone: (head, decoder mean, lowest, bias).
ITM_IDENTITY = (1.0, 0.0, 0.0, 0.0)


class FusionHeads(nn.Module):
    """Projections of the pooled image/text states into the joint embedding space `E`, the learnable
    ITC temperature (as log of its inverse, CLIP style), and the ITM head on the fused [CLS] state.
    With `token_embed`, also per-token projections of image patches and caption tokens and their own
    temperature, for the word-region (FILIP) contrastive loss. With `audio`, a projection of the
    pooled audio into the same space and its own temperature, for audio-text contrastive learning."""

    def __init__(self, dim: int, embed_dim: int, init_temperature: float = 0.07, token_embed: bool = False,
                 audio: bool = False, itm_pool: str = "cls", itm_lm: bool = False,
                 itm_calibration: bool = False):
        super().__init__()
        if itm_pool not in ("cls", "tokens"):
            raise ValueError(f"itm_pool must be 'cls' or 'tokens', got {itm_pool!r}")
        self.image_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.itm = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        self.itm_pool = itm_pool
        if itm_pool == "tokens":  # only then: a "cls" model's state dict is unchanged
            self.itm_weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))
        if itm_lm:  # weights of the caption decoder's (mean, lowest) token log-probability in ITM
            # Built without drawing random numbers: the modules after it initialise as without it.
            self.itm_lm = nn.utils.skip_init(nn.Linear, 2, 1)
            with torch.no_grad():
                self.itm_lm.weight.fill_(1.0)  # a likelier caption is a likelier match from the start
                self.itm_lm.bias.zero_()
        if itm_calibration:  # weights of (ITM logit, decoder mean, lowest log-prob, bias), fitted after training
            self.register_buffer("itm_calibration", torch.tensor(ITM_IDENTITY))
        self.token_embed = token_embed
        if token_embed:
            self.patch_proj = nn.Linear(dim, embed_dim)
            self.word_proj = nn.Linear(dim, embed_dim)
            self.token_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        if audio:  # only then: an image-text model's state dict is unchanged
            self.audio_proj = nn.Linear(dim, embed_dim)
            self.audio_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @torch.no_grad()
    def reset_itm_calibration(self) -> None:
        """Back to scoring ITM with the head alone (when calibrated). Training moves the head, so
        weights fitted to the old one no longer hold."""
        if hasattr(self, "itm_calibration"):
            self.itm_calibration.copy_(torch.tensor(ITM_IDENTITY))

    def embed_tokens(self, patches: Tensor, words: Tensor) -> tuple[Tensor, Tensor]:
        """Image patches `(B, N, D)` and text tokens `(B, L, D)` -> `(B, N, E)`, `(B, L, E)`, L2-normalised."""
        return (nn.functional.normalize(self.patch_proj(patches), dim=-1),
                nn.functional.normalize(self.word_proj(words), dim=-1))

    def token_scale(self) -> Tensor:
        """Logit scale of the word-region loss, clamped at 100 like `scale`."""
        return self.token_logit_scale.exp().clamp(max=100.0)

    def embed_image(self, pooled: Tensor) -> Tensor:
        """`(B, D) -> (B, E)`, L2-normalised."""
        return nn.functional.normalize(self.image_proj(pooled), dim=-1)

    def embed_text(self, pooled: Tensor) -> Tensor:
        """`(B, D) -> (B, E)`, L2-normalised."""
        return nn.functional.normalize(self.text_proj(pooled), dim=-1)

    def embed_audio(self, pooled: Tensor) -> Tensor:
        """Pooled audio `(B, D) -> (B, E)`, L2-normalised."""
        return nn.functional.normalize(self.audio_proj(pooled), dim=-1)

    def audio_scale(self) -> Tensor:
        """Logit scale of the audio-text contrastive loss, clamped at 100 like `scale`."""
        return self.audio_logit_scale.exp().clamp(max=100.0)

    def scale(self) -> Tensor:
        """ITC logit scale 1/T, clamped at 100 as in CLIP so training cannot blow it up."""
        return self.logit_scale.exp().clamp(max=100.0)

    def match(self, fused: Tensor, mask: Tensor | None = None) -> Tensor:
        """ITM logit `(B,)` from fused tokens `(B, L, D)`: with `itm_pool="cls"`, the head on their
        first ([CLS]) position; with "tokens", each token's logit, averaged with softmax weights the
        head also reads from the token (padding, `mask (B, L)` == 0, weighs nothing). The weights
        can settle on the one phrase that does not match the image."""
        if self.itm_pool == "cls":
            return self.itm(fused[:, 0]).squeeze(-1)
        scores = self.itm(fused).squeeze(-1)
        weights = self.itm_weight(fused).squeeze(-1).float()
        if mask is not None:
            weights = weights.masked_fill(mask == 0, float("-inf"))
        return (weights.softmax(dim=-1).to(scores.dtype) * scores).sum(dim=-1)
