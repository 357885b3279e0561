"""Sample decoding: shard sample -> tensors, tokenizer, transforms, collate."""

from mmcore.data.collate import collate, pad_ids
from mmcore.data.sample import SampleConfig, decode_sample
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
    "SPECIAL_TOKENS", "SampleConfig", "collate", "decode_sample", "decode_text", "encode",
    "image_to_tensor", "image_transform", "load_image", "load_tokenizer", "pad_ids",
    "special_token_ids", "train_tokenizer",
]
