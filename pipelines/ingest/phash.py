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


def thumbnail(img: Image.Image) -> Image.Image:
    """32x32 greyscale: one grey plane, an integer k x k block average (cheap: integer sums) down
    to >= 64 px on the shorter side, then a box filter to 32x32 (float taps, now over few pixels)."""
    grey = img.convert("L")
    k = max(1, min(grey.size) // (2 * _N))
    return (grey.reduce(k) if k > 1 else grey).resize((_N, _N), Image.Resampling.BOX)


def phash(img: Image.Image) -> int:
    """64-bit int: bit set where a low-frequency DCT coefficient exceeds their median."""
    grey = np.frombuffer(thumbnail(img).tobytes(), dtype=np.uint8).reshape(_N, _N).astype(np.float64)
    low = (_DCT_LOW @ grey @ _DCT_LOW_T).ravel()  # row-major: coefficient (u, v) is bit u * K + v
    mid = np.sort(low)[_K * _K // 2 - 1 : _K * _K // 2 + 1]
    median = (mid[0] + mid[1]) / 2  # np.median's value, at a fraction of its cost on 64 numbers
    bits = np.packbits(low > median, bitorder="little")  # bit i = coefficient i
    return int.from_bytes(bits.tobytes(), "little")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
