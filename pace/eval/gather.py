"""Gather per-rank predictions onto every rank; ranks may hold different numbers of samples (or none)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pace.eval.predictions import Predictions


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _comm_device(group) -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(rows: torch.Tensor, counts: list[int], group) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs per rank: pad to the longest, gather, trim."""
    device = _comm_device(group)
    longest = max(counts)
    padded = rows.new_zeros((longest, *rows.shape[1:]), device=device)
    padded[: rows.shape[0]] = rows.to(device)
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded, group=group)
    return [t[:n].cpu() for t, n in zip(out, counts)]


def gather_predictions(local: Predictions, group=None) -> Predictions:
    """All ranks' predictions, concatenated in rank order, on every rank.

    Without an initialised process group (or with one rank) this returns `local` unchanged.

    Args:
        local: this rank's predictions (possibly empty).
        group: the process group; None is the default group.

    Raises:
        ValueError: ranks disagree on the number of classes or on whether logits are kept.
    """
    world = _world_size(group)
    if world == 1:
        return local
    meta = [None] * world
    has_rows = len(local) > 0
    info = (
        local.keys,
        local.num_classes if has_rows else None,
        local.topk.shape[1],
        local.logits is not None,
        local.confidence is not None,
    )
    dist.all_gather_object(meta, info, group=group)
    counts = [len(m[0]) for m in meta]
    num_classes = {m[1] for m in meta if m[1] is not None}
    if len(num_classes) > 1:
        raise ValueError(f"ranks disagree on the number of classes: {sorted(num_classes)}")
    widths = {m[2] for m, n in zip(meta, counts) if n}
    keep_logits = {m[3] for m in meta}
    keep_confidence = {m[4] for m in meta}
    if len(widths) > 1 or len(keep_logits) > 1 or len(keep_confidence) > 1:
        raise ValueError(
            f"ranks disagree on top-k width {sorted(widths)}, on keeping logits {sorted(keep_logits)} or "
            f"confidences {sorted(keep_confidence)}"
        )
    if not num_classes:  # no rank saw a sample
        return local
    (c,) = num_classes
    (width,) = widths
    topk = local.topk if has_rows else local.topk.new_zeros((0, width))
    parts = {
        "topk": _all_gather_rows(topk, counts, group),
        "targets": _all_gather_rows(local.targets, counts, group),
        "loss": _all_gather_rows(local.loss, counts, group),
    }
    if keep_confidence.pop():
        confidence = local.confidence if local.confidence is not None else local.loss.new_zeros((0,))
        parts["confidence"] = _all_gather_rows(confidence, counts, group)
    if keep_logits.pop():
        logits = local.logits if has_rows else local.loss.new_zeros((0, c))
        parts["logits"] = _all_gather_rows(logits, counts, group)
    per_rank = [
        Predictions(keys=m[0], num_classes=c, **{name: tensors[r] for name, tensors in parts.items()})
        for r, m in enumerate(meta)
    ]
    return Predictions.concat(per_rank)
