"""Sample decoding: shard sample -> tensors, tokenizer, transforms, collate."""

from mmcore.data.collate import collate, collate_audio, pad_ids, pad_waves
from mmcore.data.sample import SampleConfig, ShardSample, decode_sample, parse_sample, waveform
from mmcore.data.tokenizer import (
    SPECIAL_TOKENS,
    decode_text,
    encode,
    load_tokenizer,
    special_token_ids,
    train_tokenizer,
)
from mmcore.data.transforms import image_to_tensor, image_transform, load_image

__all__ = [
    "SPECIAL_TOKENS", "SampleConfig", "ShardSample", "collate", "collate_audio", "decode_sample", "decode_text", "encode",
    "image_to_tensor", "image_transform", "load_image", "load_tokenizer", "pad_ids", "pad_waves", "parse_sample",
    "special_token_ids", "train_tokenizer", "waveform",
]
