"""Throughput meters: images/s, the data-wait share, step time, peak memory and MFU between two log records."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak TFLOP/s by GPU name fragment, for the MFU estimate (override with trainer.peak_tflops).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


class ThroughputMeter:
    """Accumulates data-wait and step time between two `summary()` calls.

    Args:
        device: the training device (peak memory is read from CUDA there).
        flops_per_image: training FLOPs per image (forward + backward) for MFU; None: no MFU.
        peak_tflops: the device's peak TFLOP/s for MFU.
    """

    def __init__(self, device: torch.device, flops_per_image: float | None = None, peak_tflops: float | None = None):
        self.device = device
        self.flops_per_image = flops_per_image
        self.peak_tflops = peak_tflops
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.data_s = 0.0
        self.step_s = 0.0
        self.images = 0
        self.steps = 0

    def add(self, data_s: float, step_s: float, images: int) -> None:
        """Account one optimizer update.

        Args:
            data_s: seconds spent waiting for batches.
            step_s: seconds spent computing (forward, backward, update).
            images: images processed by this rank.
        """
        self.data_s += data_s
        self.step_s += step_s
        self.images += images
        self.steps += 1

    def images_per_second(self) -> float:
        """This rank's images per second in the window, data wait included."""
        total = self.data_s + self.step_s
        return self.images / total if total > 0 else 0.0

    def summary(self, world_size: int) -> dict[str, float]:
        """Window metrics, then a reset.

        Args:
            world_size: ranks in the job (global images/s assumes they run at the same pace).
        """
        total = self.data_s + self.step_s
        out = {
            "perf/images_per_s": self.images_per_second() * world_size,
            "perf/data_wait_share": self.data_s / total if total > 0 else 0.0,
            "perf/step_time_s": total / max(self.steps, 1),
            "perf/peak_memory_gib": peak_memory_gib(self.device),
        }
        if self.flops_per_image and self.peak_tflops:
            out["perf/mfu"] = self.images_per_second() * self.flops_per_image / (self.peak_tflops * 1e12)
        self.reset()
        return out


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or the process's peak resident memory on CPU.

    Args:
        device: the training device.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def device_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak TFLOP/s of a known GPU, else None.

    Args:
        device: the training device.
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
