"""Top-1 / top-5 of a model on a held-out loader, summed over ranks (the Trainer's evaluator)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from itertools import islice

import torch
from torch import nn

from pace.distributed import DistEnv, all_reduce_sum


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    env: DistEnv,
    autocast: AbstractContextManager | None = None,
    limit_batches: int | None = None,
) -> dict[str, float]:
    """Accuracy of `model` on `loader`, counted exactly over all ranks.

    Args:
        model: the model to evaluate (put in eval mode for the duration).
        loader: yields `(images, targets, ...)`; each rank sees its own part of the split.
        device: where to compute.
        env: this process's place in the job (counts are summed over ranks).
        autocast: mixed-precision context for the forward pass.
        limit_batches: evaluate only this many batches per rank.

    Returns:
        `top1` and `top5` in percent, mean cross-entropy `loss`, and `count` (images evaluated).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for batch in islice(loader, limit_batches):
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast or nullcontext():
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5.eq(targets[:, None])
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, targets, reduction="sum")
        sums[3] += targets.numel()
    model.train(was_training)
    correct1, correct5, loss_sum, count = all_reduce_sum(sums, env).tolist()
    n = max(count, 1.0)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "count": count}
