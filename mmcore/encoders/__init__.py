"""Modality encoders: images (torchvision ResNet / ViT), text (transformers BERT) and audio (log-mel
transformer)."""

from mmcore.encoders.audio import AudioEncoder, AudioEncoderConfig, AudioEncoding, audio_encoder_config
from mmcore.encoders.image import ImageEncoder, ImageEncoderConfig
from mmcore.encoders.text import TextEncoder, TextEncoderConfig

__all__ = ["AudioEncoder", "AudioEncoderConfig", "AudioEncoding", "ImageEncoder", "ImageEncoderConfig",
           "TextEncoder", "TextEncoderConfig", "audio_encoder_config"]
