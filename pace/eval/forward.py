"""One pass of a model over an eval loader, shared by the classification and the k-NN evaluations: eval mode for
the pass, autocast, channels-last images, checked `(images, targets, keys)` batches and the time spent waiting for
the loader.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoaderWait:
    """Seconds this rank spent waiting for its loader during a pass (the first sign of a starved loader)."""

    seconds: float = 0.0


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` without its DDP wrapper, in eval mode; its previous mode is restored on exit.

    Args:
        model: a module, DDP-wrapped or not.
    """
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def as_amp_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The autocast dtype for `bf16`/`bfloat16`/`fp16`/`float16` (or a dtype, or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown AMP dtype {dtype!r}; use one of {sorted(names)} or None")
    return names[dtype]


def unpack_batch(batch, index: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`(images, targets, keys)` of an eval batch, checked: every sample has a non-empty string key.

    Raises:
        TypeError: the batch is not a 3-tuple.
        ValueError: naming the batch with a missing key or mismatched lengths.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        got = type(batch).__name__
        raise TypeError(f"eval batch {index}: the loader must yield (images, targets, keys), got {got}")
    images, targets, keys = batch
    keys = list(keys)
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ValueError(f"eval batch {index}: missing or invalid sample key {key!r}; every sample needs its key")
    if not (len(keys) == len(images) == len(targets)):
        raise ValueError(
            f"eval batch {index}: {len(images)} images, {len(targets)} targets and {len(keys)} keys do not match"
        )
    return images, torch.as_tensor(targets), keys


def forward_batches(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    *,
    device: torch.device | str,
    wait: LoaderWait,
    amp_dtype: torch.dtype | str | None = None,
    channels_last: bool = False,
    limit_batches: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[str]]]:
    """Run `forward` on each batch of `loader`; call it inside `torch.inference_mode()` and `eval_mode`.

    Args:
        forward: images (B, 3, H, W) on `device` -> outputs (B, ...).
        loader: yields `(images, targets, keys)`.
        device: where the forward pass runs.
        wait: adds the seconds spent waiting for the loader.
        amp_dtype: autocast dtype (`torch.bfloat16`, `"bf16"`, ...), None for full precision.
        channels_last: feed images in channels-last memory format.
        limit_batches: stop after this many batches.

    Yields:
        The batch index, the outputs, the loader's (CPU) targets and the samples' keys.
    """
    device = torch.device(device)
    dtype = as_amp_dtype(amp_dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = iter(loader)
    index = 0
    while limit_batches is None or index < limit_batches:
        start = time.perf_counter()
        batch = next(batches, None)
        wait.seconds += time.perf_counter() - start
        if batch is None:
            return
        images, targets, keys = unpack_batch(batch, index)
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast:
            outputs = forward(images)
        yield index, outputs, targets, keys
        index += 1
