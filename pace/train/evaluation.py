"""Top-1 / top-5 of a model on the held-out loader: the evaluator of `pace.eval`, the same code as `pace-eval`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from pace.distributed import DistEnv
from pace.eval import evaluate as evaluate_keyed


def _keyed(loader: Iterable, rank: int) -> Iterator[tuple]:
    # pace.eval matches predictions to samples by key. Held-out batches without keys (synthetic data) are named by
    # rank, batch and position, which identifies each of their samples uniquely.
    for index, batch in enumerate(loader):
        if len(batch) >= 3:
            yield batch[0], batch[1], batch[2]
        else:
            yield batch[0], batch[1], [f"rank{rank}/batch{index}/{i}" for i in range(len(batch[1]))]


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    env: DistEnv,
    autocast: AbstractContextManager | None = None,
    limit_batches: int | None = None,
) -> dict[str, float]:
    """Accuracy of `model` on `loader`, every sample counted once over all ranks.

    Args:
        model: the model to evaluate (put in eval mode for the duration).
        loader: yields `(images, targets, keys)` or `(images, targets)`; each rank sees its own part of the split.
        device: where to compute.
        env: this process's place in the job.
        autocast: mixed-precision context for the forward pass.
        limit_batches: evaluate only this many batches per rank.

    Returns:
        `top1` and `top5` in percent, mean cross-entropy `loss`, and `count` (images evaluated).
    """
    # pace.eval gathers over the default process group, the one `init_distributed` joined.
    with autocast or nullcontext():
        result = evaluate_keyed(model, _keyed(loader, env.rank), device=device, limit_batches=limit_batches)
    metrics = result.metrics
    return {
        "top1": metrics["val/top1"],
        "top5": metrics.get("val/top5", 100.0),  # not reported when there are at most 5 classes
        "loss": metrics["val/loss"],
        "count": result.counts["val/top1"],
    }
