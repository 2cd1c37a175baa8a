"""Metrics: rank-0 JSONL + wandb sink, throughput / data-wait / memory / MFU meters, PACE telemetry."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pace.analysis import is_pace_model, layer_telemetry
from pace.distributed import DistEnv
from pace.train.config import LoggerConfig

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s by GPU name fragment, for the MFU estimate (override with trainer.peak_tflops).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def git_sha() -> str | None:
    """The commit of the code that runs (suffix `-dirty` with local changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _records(path: Path) -> list[dict[str, Any]]:
    # A process killed (or a disk that filled) in the middle of a write leaves a torn last line: drop it, since
    # the resumed run writes that step again. A bad line elsewhere is damage to report, with the file's name.
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                log.warning("%s: ignoring a torn last line (%d characters)", path, len(line))
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({e})") from e
    return records


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricLogger:
    """Writes metric records to `metrics.jsonl` in the run dir and, if configured, to wandb and TensorBoard (event
    files under `<run_dir>/tensorboard`), rank 0 only.

    Args:
        run_dir: the run directory.
        env: this process's place in the job.
        cfg: wandb / TensorBoard settings (None, or both off: JSONL only).
        config: the resolved config recorded with the run.
        run_name: wandb run name.
    """

    def __init__(
        self,
        run_dir: str | Path,
        env: DistEnv,
        cfg: LoggerConfig | None,
        config: dict[str, Any],
        run_name: str,
    ) -> None:
        self.active = env.is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._tensorboard = None
        self._purge_step: int | None = None
        self._use_tensorboard = cfg is not None and cfg.tensorboard
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg is not None and cfg.wandb and cfg.mode != "disabled":
            import wandb

            # A run id derived from the run dir makes a restarted job continue the same wandb run.
            run_id = hashlib.sha1(str(self.path.parent.resolve()).encode()).hexdigest()[:16]
            self._wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                id=run_id,
                resume="allow",
                mode=cfg.mode,
                dir=str(self.path.parent),
                config=config,
                tags=list(cfg.tags),
            )

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run redoes them, so the file reads as one uninterrupted run).

        Args:
            step: the step of the checkpoint being resumed.
        """
        self._purge_step = step + 1  # TensorBoard hides the events of the abandoned steps
        if not self.active or not self.path.exists():
            return
        kept = [r for r in _records(self.path) if r.get("step", 0) <= step]
        _atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record `metrics` at optimizer update `step`.

        Args:
            metrics: name -> number.
            step: optimizer updates done so far.
        """
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._use_tensorboard:
            self._log_tensorboard(metrics, step)

    def _log_tensorboard(self, metrics: dict[str, Any], step: int) -> None:
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(
                log_dir=str(self.path.parent / "tensorboard"), purge_step=self._purge_step
            )
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._tensorboard.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        """Finish the wandb run and flush the TensorBoard events."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


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


def training_flops_per_image(model: nn.Module, img_size: int, device: torch.device) -> float:
    """Forward FLOPs of one image counted by torch's FlopCounterMode, times 3 for forward + backward.

    Args:
        model: the unwrapped model.
        img_size: input resolution.
        device: where to run the counting forward pass.
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    model.train(was_training)
    return 3.0 * counter.get_total_flops()


def pace_telemetry(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Each PACE block's alpha, beta, tau and the coding rates R, R_c, dR of `images`' tokens, as
    `pace/block<i>/<name>` (`pace.analysis.layer_telemetry`, a read-only forward); empty for other models.

    Args:
        model: the unwrapped model.
        images: a few normalised held-out images (B, 3, H, W).
    """
    return layer_telemetry(model, images) if is_pace_model(model) else {}
