"""Perceptual hash (pHash): 64 bits from the low frequencies of a 32x32 greyscale DCT.

Near-identical images (re-encoded, resized, lightly edited) get hashes a few bits apart.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_N = 32
_K = 8


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


# The K x K low-frequency corner of the 2-D DCT is D[:K] @ G @ D[:K].T: two small products
# (~10k multiply-adds on 10 KB of data). The equivalent single (K*K, N*N) matrix would be
# 512 KB, which image decoding evicts from the caches between calls: ~60 us a call to re-read.
_DCT_LOW = _dct_matrix(_N)[:_K].copy()
_DCT_LOW_T = _DCT_LOW.T.copy()


def thumbnail(img: Image.Image) -> bytes:
    """The 32x32 greyscale the hash is computed from, as 1024 bytes: one grey plane, an integer
    k x k block average (cheap: integer sums) down to >= 64 px on the shorter side, then a box
    filter to 32x32 (float taps, now over few pixels)."""
    grey = img.convert("L")
    k = max(1, min(grey.size) // (2 * _N))
    return (grey.reduce(k) if k > 1 else grey).resize((_N, _N), Image.Resampling.BOX).tobytes()


def phash_many(thumbs: list[bytes]) -> list[int]:
    """64-bit ints from `thumbnail`s: bit i set where low-frequency DCT coefficient i exceeds
    their median.

    Many at once, because each numpy call costs ~20 us when image decoding has just evicted its
    code and data from the caches (~1-2 us warm): per image, the ~10 calls took ~120 us of a
    ~4.5 ms sample; per batch, they are a few us an image. Each image's coefficients are
    computed by the same products as alone, so the hash does not depend on the batch.
    """
    if not thumbs:
        return []
    grey = np.frombuffer(b"".join(thumbs), dtype=np.uint8).reshape(len(thumbs), _N, _N).astype(np.float64)
    low = (_DCT_LOW @ grey @ _DCT_LOW_T).reshape(len(thumbs), _K * _K)  # row-major: (u, v) is bit u * K + v
    mid = np.sort(low, axis=1)[:, _K * _K // 2 - 1 : _K * _K // 2 + 1]
    median = (mid[:, :1] + mid[:, 1:]) / 2  # np.median's value, at a fraction of its cost
    bits = np.packbits(low > median, axis=1, bitorder="little")  # bit i = coefficient i
    return [int.from_bytes(row.tobytes(), "little") for row in bits]


def phash(img: Image.Image) -> int:
    """The 64-bit perceptual hash of one image."""
    return phash_many([thumbnail(img)])[0]


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
