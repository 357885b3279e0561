"""Image transforms for training and evaluation, and the helper that turns one image into model input."""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@lru_cache(maxsize=8)  # built once per (size, mode), not once per sample
def image_transform(image_size: int, train: bool) -> T.Compose:
    """PIL RGB -> `(3, S, S)` normalised.

    Training uses only a mild random resized crop: captions name colours and left/right, so colour
    jitter and horizontal flips would make them wrong.
    """
    if train:
        first = [T.RandomResizedCrop(image_size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True)]
    else:
        first = [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
    return T.Compose([*first, T.ToTensor(), T.Normalize(MEAN, STD)])


def load_image(source) -> Image.Image:
    """A PIL RGB image from a PIL image, encoded bytes, or a file path."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(f"image file {source} not found")
    with Image.open(source) as im:
        return im.convert("RGB")


def image_to_tensor(source, image_size: int) -> torch.Tensor:
    """One image (PIL, bytes or path) -> model input `(1, 3, S, S)` with the evaluation transform."""
    return image_transform(image_size, train=False)(load_image(source)).unsqueeze(0)
