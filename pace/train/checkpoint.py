"""Checkpoints: atomic files, keep-last-N plus best, RNG capture, and the safetensors release export.

A checkpoint holds only tensors and primitive containers, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models import save_for_hf
from torch import nn

from pace.errors import RunError, is_no_space, no_space_message

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"step_(\d+)\.pt")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write `obj` to a temporary file beside `path`, fsync it, then rename it into place.

    A crash at any moment leaves either the previous file or the new one, never a partial one.

    Args:
        obj: tensors and primitive containers.
        path: destination file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a partial file only takes the space the next attempt needs
        _raise_write_error(e, path)
        raise
    os.replace(tmp, path)
    # The rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _raise_write_error(error: BaseException, path: Path) -> None:
    # torch's zip writer reports a full disk as a RuntimeError ("file write failed"), Python as OSError(ENOSPC).
    if is_no_space(error):
        raise RunError(no_space_message(error, path)) from error  # type: ignore[arg-type]
    if isinstance(error, RuntimeError) and "write failed" in str(error):
        raise RunError(f"writing {path} failed (no space left on device or an I/O error): {error}") from error


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a training checkpoint on CPU with `weights_only=True`.

    Args:
        path: the checkpoint file.
        mmap: map the file instead of reading it (tensors are read when first used).
    """
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states, as tensors and primitives."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": (int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured.

    Args:
        state: a dict from `rng_state`.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    has_gauss, cached = state["numpy_gauss"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Keeps `step_XXXXXXXX.pt` files in a folder: the last `keep_last`, plus `best.pt`.

    Args:
        directory: where checkpoints live (created on first save).
        keep_last: how many recent step checkpoints to keep.
        keep_best: keep a copy of the checkpoint with the highest metric as `best.pt`.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, keep_best: bool = True) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best

    def step_files(self) -> list[Path]:
        """Step checkpoints on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_FILE.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest step checkpoint, or None."""
        files = self.step_files()
        return files[-1] if files else None

    def save(self, state: dict[str, Any], step: int, is_best: bool = False) -> Path:
        """Write `state` as the checkpoint of `step`, then prune old ones.

        Args:
            state: the checkpoint dict (tensors and primitives only).
            step: optimizer updates done so far (names the file).
            is_best: also make this the `best.pt` checkpoint.
        """
        path = self.directory / f"step_{step:08d}.pt"
        try:
            atomic_torch_save(state, path)
        except RunError as e:
            raise RunError(f"{e}; the last checkpoint on disk, {self.latest()}, is intact") from e
        if is_best and self.keep_best:
            best = self.directory / "best.pt"
            tmp = self.directory / ".best.pt.tmp"
            tmp.unlink(missing_ok=True)
            # A hard link makes best.pt without writing the file twice; the rename keeps the swap atomic.
            os.link(path, tmp)
            os.replace(tmp, best)
        for old in self.step_files()[: -self.keep_last]:
            old.unlink()
        log.info("saved checkpoint %s", path)
        return path

    def remove_partial_files(self) -> None:
        """Delete temporary files a killed writer left behind."""
        if self.directory.is_dir():
            for tmp in self.directory.glob(".*.tmp"):
                tmp.unlink()


def export_release(model: nn.Module, directory: str | Path, model_args: dict[str, Any]) -> Path:
    """Write `model.safetensors` and a timm `config.json` (with `pretrained_cfg`) into `directory`.

    Load it back with `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))` or
    `timm.create_model("local-dir:<directory>")`.

    Args:
        model: the unwrapped model (the EMA copy for a release).
        directory: output folder.
        model_args: the architecture keyword arguments the model was created with.
    """
    directory = Path(directory)
    args = {k: v for k, v in model_args.items() if k != "drop_path_rate"}
    save_for_hf(model, str(directory), model_args=args, safe_serialization=True)
    log.info("exported release to %s", directory)
    return directory / "model.safetensors"
