"""Image cleaning: verify by decoding, refuse bombs from the header, normalise to RGB, resize,
re-encode as JPEG. Every refusal is an `ImageReject` with a report reason."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipelines.config import SectionView
from pipelines.ingest.phash import phash_many, thumbnail
from pipelines.ingest.rejects import Reject

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a reject, never a padded image
ALLOWED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# A bytes or str literal inside a decoder's message: the file's own bytes (a PPM header token,
# a marker), which a report must not echo (the "image" may be any file a manifest names).
_LITERAL = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')


def describe(e: BaseException) -> str:
    """An exception as a reject detail: its type and message, with quoted file content elided."""
    return f"{type(e).__name__}: {_LITERAL.sub('<bytes>', str(e))[:200]}"


class ImageReject(Reject):
    """An image that cannot be kept."""


@dataclass(frozen=True)
class ImageSpec(SectionView):
    """The `DataConfig` fields that image cleaning reads: `ImageSpec.of(cfg.data)`."""

    image_size: int
    resize_mode: str
    jpeg_quality: int
    min_side: int
    max_aspect: float
    max_pixels: int
    max_image_bytes: int


@dataclass(frozen=True)
class CleanImage:
    jpeg: bytes
    width: int  # original, after EXIF orientation
    height: int
    format: str
    thumb: bytes  # the cleaned image's 32x32 grey thumbnail, which its perceptual hash is made of

    @property
    def phash(self) -> int:
        """64-bit perceptual hash (`phash.phash_many` hashes many thumbnails at once: cheaper)."""
        return phash_many([self.thumb])[0]

    @property
    def pixel_sha(self) -> str:
        """sha256 of the cleaned JPEG: same pixels + settings -> same bytes."""
        return hashlib.sha256(self.jpeg).hexdigest()


def _open(data: bytes, spec: ImageSpec) -> Image.Image:
    """Open lazily and check the header: format and pixel count, before any decoding."""
    if not data:
        raise ImageReject("empty_file", "0 bytes")
    if len(data) > spec.max_image_bytes:
        raise ImageReject("too_large", f"{len(data)} bytes > data.max_image_bytes = {spec.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageReject("decompression_bomb", describe(e)) from e
    except Image.UnidentifiedImageError as e:  # its message names a BytesIO object: no use in a report
        # Never the bytes themselves: a manifest may name any file (`../../etc/passwd`).
        raise ImageReject("not_an_image", f"no image format recognises these {len(data)} bytes") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for non-images
        raise ImageReject("not_an_image", describe(e)) from e
    if img.format not in ALLOWED_FORMATS:
        raise ImageReject("unsupported_format", f"{img.format}; allowed: {sorted(ALLOWED_FORMATS)}")
    w, h = img.size
    if w * h > spec.max_pixels:
        raise ImageReject("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {spec.max_pixels}")
    if img.format != "JPEG":  # verify() checks PNG chunk CRCs, which decoding alone skips
        try:
            Image.open(io.BytesIO(data)).verify()
        except Exception as e:  # noqa: BLE001
            raise ImageReject("corrupt_image", describe(e)) from e
    return img


def _draft_size(w: int, h: int, spec: ImageSpec) -> tuple[int, int] | None:
    """The smallest size the resize will need, so JPEG can decode at a reduced scale."""
    if spec.resize_mode == "none":
        return None
    side = min(w, h) if spec.resize_mode in ("shorter", "center_crop") else max(w, h)
    scale = spec.image_size / max(side, 1)
    return (max(1, int(w * scale) + 1), max(1, int(h * scale) + 1)) if scale < 1 else None


def _decode(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Decode every byte (truncation and corruption surface here) and apply EXIF orientation."""
    draft = _draft_size(*img.size, spec) if img.format == "JPEG" else None
    try:
        if draft:
            img.draft(None, draft)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the decoded pixels
        return img
    except OSError as e:
        reason = "truncated_image" if "truncat" in str(e).lower() else "corrupt_image"
        raise ImageReject(reason, describe(e)) from e
    except Exception as e:  # noqa: BLE001 - decoders raise SyntaxError, ValueError, ...
        raise ImageReject("corrupt_image", describe(e)) from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: 16-bit scaled down, alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def resize(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize by mode: shorter/longer side to N, centre crop N x N, or none."""
    w, h = img.size
    n = spec.image_size
    if spec.resize_mode == "none":
        return img
    side = max(w, h) if spec.resize_mode == "longer" else min(w, h)
    scale = n / side
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if spec.resize_mode == "center_crop":
        left, top = (img.width - n) // 2, (img.height - n) // 2
        img = img.crop((left, top, left + n, top + n))
    return img


def clean_image(data: bytes, spec: ImageSpec) -> CleanImage:
    """Raw bytes -> cleaned JPEG; raises ImageReject with the reason."""
    img = _open(data, spec)
    fmt = img.format
    ow, oh = img.size  # header size; a JPEG draft decode below may be smaller
    try:
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF says rotate by 90 degrees
            ow, oh = oh, ow
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, not fatal
        pass
    if min(ow, oh) < spec.min_side:
        raise ImageReject("too_small", f"{ow}x{oh}: a side < min_side {spec.min_side}")
    if max(ow, oh) / min(ow, oh) > spec.max_aspect:
        raise ImageReject("bad_aspect_ratio", f"{ow}x{oh} exceeds max_aspect {spec.max_aspect}")
    img = resize(to_rgb(_decode(img, spec)), spec)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=spec.jpeg_quality)
    jpeg = buf.getvalue()
    return CleanImage(
        jpeg=jpeg,
        width=ow,
        height=oh,
        format=fmt,
        thumb=thumbnail(img),
    )
