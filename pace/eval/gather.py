"""Gather per-rank predictions onto every rank; ranks may hold different numbers of samples (or none)."""

from __future__ import annotations

from pace.distributed import DistEnv, all_gather_object, all_gather_rows
from pace.eval.predictions import Predictions


def _agreed_layout(meta: list[tuple], counts: list[int]) -> tuple[int | None, int | None, bool, bool]:
    """The class count, top-k width and kept fields every rank agrees on (class count None: no rank has rows).

    Raises:
        ValueError: ranks disagree on the number of classes or on whether logits are kept.
    """
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
    if not num_classes:
        return None, None, keep_logits.pop(), keep_confidence.pop()
    return num_classes.pop(), widths.pop(), keep_logits.pop(), keep_confidence.pop()


def gather_predictions(local: Predictions, env: DistEnv) -> Predictions:
    """All ranks' predictions, concatenated in rank order, on every rank.

    With one process this returns `local` unchanged.

    Args:
        local: this rank's predictions (possibly empty).
        env: this process's place in the job.

    Raises:
        ValueError: ranks disagree on the number of classes or on whether logits are kept.
    """
    if not env.is_distributed:
        return local
    has_rows = len(local) > 0
    info = (
        local.keys,
        local.num_classes if has_rows else None,
        local.topk.shape[1],
        local.logits is not None,
        local.confidence is not None,
    )
    meta = all_gather_object(info, env)
    counts = [len(m[0]) for m in meta]
    c, width, keep_logits, keep_confidence = _agreed_layout(meta, counts)
    if c is None:  # no rank saw a sample
        return local
    topk = local.topk if has_rows else local.topk.new_zeros((0, width))
    parts = {
        "topk": all_gather_rows(topk, counts, env),
        "targets": all_gather_rows(local.targets, counts, env),
        "loss": all_gather_rows(local.loss, counts, env),
    }
    if keep_confidence:
        confidence = local.confidence if local.confidence is not None else local.loss.new_zeros((0,))
        parts["confidence"] = all_gather_rows(confidence, counts, env)
    if keep_logits:
        logits = local.logits if has_rows else local.loss.new_zeros((0, c))
        parts["logits"] = all_gather_rows(logits, counts, env)
    per_rank = [
        Predictions(keys=m[0], num_classes=c, **{name: tensors[r] for name, tensors in parts.items()})
        for r, m in enumerate(meta)
    ]
    return Predictions.concat(per_rank)
