"""Modality encoders: images (torchvision ResNet / ViT) and text (transformers BERT)."""

from mmcore.encoders.image import ImageEncoder, ImageEncoderConfig
from mmcore.encoders.text import TextEncoder, TextEncoderConfig

__all__ = ["ImageEncoder", "ImageEncoderConfig", "TextEncoder", "TextEncoderConfig"]
