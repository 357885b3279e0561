"""Building blocks shared by the fusion modules and the decoder."""

from mmcore.modules.attention import Attention, FeedForward, attention_mask, record_attention

__all__ = ["Attention", "FeedForward", "attention_mask", "record_attention"]
