"""Text encoder: a transformers `BertModel` built from a `BertConfig` (tiny to base) or a local directory.

Returns `(tokens (B, L, D), pooled (B, D))` with pooled = the [CLS] token's state. Nothing is
fetched: a pretrained model is read from a local HF directory with `local_files_only=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn
from transformers import BertConfig, BertModel


@dataclass
class TextEncoderConfig:
    vocab_size: int = 1000
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64
    dropout: float = 0.0
    pad_token_id: int = 0
    pretrained: str | None = None  # local HF BERT directory, loaded by build


def bert_config(cfg: TextEncoderConfig) -> BertConfig:
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=cfg.pad_token_id,
    )


def text_config_from_pretrained(path: str | Path, base: TextEncoderConfig) -> TextEncoderConfig:
    """Sizes of the BERT in a local HF directory, so the saved config alone rebuilds the model."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a HF model directory (no config.json); give a local BERT dir")
    bc = BertConfig.from_pretrained(str(path), local_files_only=True)
    return TextEncoderConfig(
        vocab_size=bc.vocab_size,
        hidden_size=bc.hidden_size,
        num_layers=bc.num_hidden_layers,
        num_heads=bc.num_attention_heads,
        intermediate_size=bc.intermediate_size,
        max_positions=bc.max_position_embeddings,
        dropout=base.dropout,
        pad_token_id=bc.pad_token_id if bc.pad_token_id is not None else 0,
        pretrained=str(path),
    )


class TextEncoder(nn.Module):
    """BERT without its pooler (the [CLS] state is projected by the model's heads instead)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(bert_config(cfg), add_pooling_layer=False)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """ids, mask `(B, L)` (mask 1 on tokens, 0 on padding) -> `(tokens (B, L, D), pooled (B, D))`."""
        tokens = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return tokens, tokens[:, 0]

    def load_pretrained(self, path: str | Path) -> None:
        """Copy the weights of a local HF BERT directory into this encoder (sizes must match)."""
        src = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        missing, unexpected = self.bert.load_state_dict(src.state_dict(), strict=False)
        if missing:
            raise ValueError(f"BERT weights in {path} lack {missing[:5]}; is it a BERT directory?")
