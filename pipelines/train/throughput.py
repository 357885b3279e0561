"""Samples per second and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Dense bf16 peak FLOP/s per device (tensor cores, no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is lower (756e12)
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16; V100 has no bf16
    "T4": 65e12,  # fp16
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100" before "H10"…
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def train_flops_per_sample(forward: Callable[[], object], batch_size: int) -> float:
    """FLOPs of one training sample: the measured forward pass x 3 (backward ~ 2x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return 3.0 * counter.get_total_flops() / max(batch_size, 1)


class Throughput:
    """Counts samples over windows of training time (eval and checkpoint time excluded).

    `overall()` is the steady-state rate: it leaves out the first window (loader start-up, first
    shard opened, FLOP count) once there is a second one.
    """

    def __init__(self):
        self.samples = 0
        self.seconds = 0.0
        self.total_samples = 0
        self.total_seconds = 0.0
        self.first: tuple[int, float] | None = None
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, samples: int) -> None:
        """Close the interval opened by `start` that produced `samples` (global) samples."""
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        self._t0 = None
        self.samples += samples
        self.seconds += dt
        if self.first is None:
            self.first = (samples, dt)
        self.total_samples += samples
        self.total_seconds += dt

    def window(self) -> float:
        """Samples/s since the last call, then reset the window."""
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        self.samples, self.seconds = 0, 0.0
        return rate

    def overall(self) -> float:
        samples, seconds = self.total_samples, self.total_seconds
        if self.first is not None and samples > self.first[0]:
            samples, seconds = samples - self.first[0], seconds - self.first[1]
        return samples / seconds if seconds > 0 else 0.0


def mfu(samples_per_s: float, flops_per_sample: float | None, peak: float | None, devices: int) -> float | None:
    """Achieved / peak FLOP/s over all devices; None when either is unknown."""
    if not flops_per_sample or not peak or devices <= 0:
        return None
    return samples_per_s * flops_per_sample / (peak * devices)
