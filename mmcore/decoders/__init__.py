"""Text decoders and generation."""

from mmcore.decoders.generation import beam_search, greedy_search
from mmcore.decoders.transformer import DecoderCache, DecoderConfig, TextDecoder

__all__ = ["DecoderCache", "DecoderConfig", "TextDecoder", "beam_search", "greedy_search"]
