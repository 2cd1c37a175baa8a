"""The classification pass shared by `pace-eval` and the Trainer: run a model over an eval loader, gather every
rank's predictions, score them by sample key."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pace.distributed import DistEnv, resolve_dist_env
from pace.eval.forward import LoaderWait, as_amp_dtype, eval_mode, forward_batches
from pace.eval.gather import gather_predictions
from pace.eval.labels import LabelSets
from pace.eval.predictions import Predictions, canonicalise, write_predictions
from pace.eval.scoring import score_predictions

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Metrics of one evaluation pass, identical on every rank.

    Args:
        metrics: `<group>/<metric>` -> value; accuracies in percent (`val/top1`, `real/top1`, ...), `val/loss`.
        counts: the number of samples behind each metric (same keys), plus `samples` (unique samples evaluated),
            `<group>/excluded`, `<group>/top{k}_correct` and `repeats_dropped`.
        seconds: wall-clock time of the pass, gathering included.
        data_seconds: time this rank spent waiting for the loader.
        predictions: the canonical (key-sorted, unique) per-sample predictions.
    """

    metrics: dict[str, float]
    counts: dict[str, int]
    seconds: float
    data_seconds: float
    predictions: Predictions = field(repr=False)

    @property
    def samples_per_second(self) -> float:
        return self.counts["samples"] / self.seconds if self.seconds > 0 else float("nan")

    def timing(self) -> dict[str, float]:
        """Wall time, throughput and the data-loading share of this rank (the first sign of a starved loader)."""
        share = 100.0 * self.data_seconds / self.seconds if self.seconds > 0 else float("nan")
        return {"seconds": self.seconds, "samples_per_second": self.samples_per_second, "data_loading_pct": share}

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics and their counts for a logger, e.g. `{"val/top1": 81.2, "val/top1_count": 50000}`."""
        out = {prefix + k: v for k, v in self.metrics.items()}
        out.update({f"{prefix}{k}_count": self.counts[k] for k in self.metrics})
        return out


def _batch_predictions(
    logits: torch.Tensor,
    targets: torch.Tensor,
    keys: list[str],
    *,
    maxk: int,
    keep_logits: bool,
    class_subset: torch.Tensor | None = None,
) -> Predictions:
    logits = logits.float()
    # Checked on the loader's (CPU) targets, so a GPU pass does not wait for the device every batch.
    bad = (targets >= logits.shape[1]).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"class-count mismatch: sample {keys[bad[0]]!r} has label {int(targets[bad[0]])} but the model produces "
            f"{logits.shape[1]} logits"
        )
    if class_subset is not None:
        logits = mask_logits(logits, class_subset, targets, keys)
    targets = targets.to(logits.device, torch.long, non_blocking=True)
    labelled = targets >= 0
    loss = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    loss = torch.where(labelled, loss, torch.full_like(loss, float("nan")))  # no loss without a label
    return Predictions(
        keys=keys,
        topk=logits.topk(min(maxk, logits.shape[1]), dim=1).indices,
        targets=targets,
        loss=loss,
        num_classes=logits.shape[1],
        logits=logits if keep_logits else None,
        confidence=logits.softmax(dim=1).amax(dim=1),
    )


def mask_logits(
    logits: torch.Tensor, class_subset: torch.Tensor, targets: torch.Tensor, keys: list[str]
) -> torch.Tensor:
    """Logits restricted to a class subset (ImageNet-A/R's 200 classes): the others become -inf, so top-k,
    softmax and the loss are those of the subset, while class indices keep their meaning in the full label space.

    Args:
        logits: (B, num_classes) logits.
        class_subset: (S,) int64 class indices that stay.
        targets: (B,) labels on the CPU; each labelled sample's class must be in the subset.
        keys: the samples' keys, for the error message.

    Raises:
        ValueError: naming a sample whose label is outside the subset, or a subset class the model lacks.
    """
    if int(class_subset.max()) >= logits.shape[1]:
        raise ValueError(
            f"class-count mismatch: the class subset names class {int(class_subset.max())} but the model produces "
            f"{logits.shape[1]} logits"
        )
    allowed = torch.zeros(logits.shape[1], dtype=torch.bool)
    allowed[class_subset] = True
    outside = ((targets >= 0) & ~allowed[targets.clamp(min=0)]).nonzero().flatten().tolist()
    if outside:
        raise ValueError(
            f"sample {keys[outside[0]]!r} has label {int(targets[outside[0]])}, which is not in the evaluator's "
            f"{len(class_subset)}-class subset"
        )
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: Iterable,
    *,
    maxk: int = 5,
    keep_logits: bool = False,
    num_classes: int | None = None,
    env: DistEnv | None = None,
    log_every: int = 0,
    class_subset: Sequence[int] | None = None,
    **forward_options,
) -> tuple[Predictions, float]:
    """Run `model` over this rank's share of the data and gather every rank's predictions.

    Args:
        model: any classifier returning (B, num_classes) logits; DDP wrappers are looked through. It is put in eval
            mode for the pass and returned to its previous mode afterwards.
        loader: yields `(images, targets, keys)`; targets of -1 mark unlabelled samples.
        maxk: how many top classes to keep per sample.
        keep_logits: also keep the full logits (for a predictions file).
        num_classes: the number of classes the data has; a model with another number of logits is an error.
        env: this process's place in the job, whose ranks are gathered (None: `resolve_dist_env()`).
        log_every: log progress every this many batches on rank 0 (0: never).
        class_subset: score only these classes (the other logits are masked to -inf), as for ImageNet-A/R.
        **forward_options: `device` and optionally `amp_dtype`, `channels_last` (convert the model likewise, for
            speed) and `limit_batches` (per rank), as `pace.eval.forward.forward_batches` takes them.

    Returns:
        The predictions of all ranks, concatenated in rank order (not yet sorted or checked for repeats), and the
        seconds this rank waited for data.
    """
    env = resolve_dist_env() if env is None else env
    subset = None if class_subset is None else torch.as_tensor(list(class_subset), dtype=torch.long)
    parts: list[Predictions] = []
    wait = LoaderWait()
    with eval_mode(model) as net:
        for index, logits, targets, keys in forward_batches(net, loader, wait=wait, **forward_options):
            check_logits(logits, num_classes)
            parts.append(
                _batch_predictions(logits, targets, keys, maxk=maxk, keep_logits=keep_logits, class_subset=subset)
            )
            if log_every and (index + 1) % log_every == 0 and env.is_main:
                log.info("eval: %d batches, %d samples on rank 0", index + 1, sum(len(p) for p in parts))
    if parts:
        local = Predictions.concat(parts).cpu()
    else:  # this rank got no samples; its width and class count come from the other ranks when gathered
        local = _no_predictions(maxk, num_classes or 0, keep_logits)
    return gather_predictions(local, env), wait.seconds


def check_logits(logits, num_classes: int | None) -> None:
    """Refuse model outputs that are not (B, num_classes) logits.

    Args:
        logits: what the model returned for one batch.
        num_classes: the number of classes the data has (None: any).

    Raises:
        TypeError: the output is not a 2-D tensor.
        ValueError: its class count differs from the data's.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = getattr(logits, "shape", type(logits).__name__)
        raise TypeError(f"the model must return (B, num_classes) logits, got {got}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"class-count mismatch: the model produces {logits.shape[1]} logits but the data has {num_classes} classes"
        )


def _no_predictions(maxk: int, num_classes: int, keep_logits: bool) -> Predictions:
    empty = torch.empty(0)
    logits = empty.reshape(0, num_classes) if keep_logits else None
    return Predictions([], empty.long().reshape(0, maxk), empty.long(), empty, num_classes, logits, empty)


def check_sample_count(found: int, expected: int | None, *, allow_partial: bool, source: str = "the data") -> None:
    """Compare the number of unique samples evaluated with what the data declares.

    Raises:
        ValueError: the counts differ and partial evaluation was not asked for (otherwise a warning is logged).
    """
    if expected is None or found == expected:
        return
    word = "fewer" if found < expected else "more"
    message = f"evaluated {found} unique samples, {word} than the {expected} that {source} declares"
    if not allow_partial:
        raise ValueError(message + " (set partial evaluation to accept this)")
    log.warning("%s; partial evaluation, metrics cover the %d samples seen", message, found)


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str,
    amp_dtype: torch.dtype | str | None = None,
    channels_last: bool = False,
    topk: Sequence[int] = (1, 5),
    name: str | None = "val",
    label_sets: Mapping[str, LabelSets] | None = None,
    num_classes: int | None = None,
    expected_samples: int | None = None,
    allow_partial: bool = False,
    predictions_path: str | Path | None = None,
    keep_logits: bool = False,
    env: DistEnv | None = None,
    log_every: int = 0,
    limit_batches: int | None = None,
    class_subset: Sequence[int] | None = None,
) -> EvalResult:
    """Evaluate a classifier on keyed data: top-k against the samples' labels and against any label sets.

    Call it on every rank with that rank's loader; every sample must reach exactly one rank. The result is the
    same on every rank and does not depend on how samples were split over ranks and workers.

    Args:
        model: any classifier returning (B, num_classes) logits (a timm model, DDP-wrapped or not).
        loader: yields `(images, targets, keys)`.
        device: where the forward pass runs.
        amp_dtype: autocast dtype (`torch.bfloat16`, `"bfloat16"`, `"float16"`), None for full precision.
        channels_last: feed images in channels-last memory format.
        topk: the top-k accuracies to report.
        name: metric group of the samples' own labels (`val` -> `val/top1`); None does not score them.
        label_sets: metric group -> label sets scored by key, e.g. `{"real": LabelSets.imagenet_real()}`.
        num_classes: the number of classes the data has (a model with another number of logits is an error).
        expected_samples: how many samples the data declares (info file); a different count is an error.
        allow_partial: accept a count that differs from `expected_samples`, and drop repeated keys, with warnings.
        predictions_path: write per-sample predictions here (rank 0 writes; `.jsonl` or `.jsonl.gz`).
        keep_logits: include the logits in the predictions file.
        env: this process's place in the job, whose ranks are gathered (None: `resolve_dist_env()`).
        log_every: progress log interval in batches (0: none).
        limit_batches: evaluate only this many batches per rank; implies partial evaluation.
        class_subset: score only these classes (ImageNet-A/R), masking the other logits.
    """
    allow_partial = allow_partial or limit_batches is not None
    env = resolve_dist_env() if env is None else env
    start = time.perf_counter()
    gathered, data_seconds = predict(
        model,
        loader,
        device=device,
        amp_dtype=as_amp_dtype(amp_dtype),
        channels_last=channels_last,
        maxk=max(max(topk), 5),
        keep_logits=keep_logits and predictions_path is not None,
        num_classes=num_classes,
        env=env,
        log_every=log_every,
        limit_batches=limit_batches,
        class_subset=class_subset,
    )
    preds, dropped = canonicalise(gathered, allow_partial=allow_partial)
    check_sample_count(len(preds), expected_samples, allow_partial=allow_partial)
    metrics, counts = score_predictions(preds, topk=topk, name=name, label_sets=label_sets)
    counts["repeats_dropped"] = dropped
    if predictions_path is not None and env.is_main:
        write_predictions(predictions_path, preds)
    return EvalResult(
        metrics=metrics,
        counts=counts,
        seconds=time.perf_counter() - start,
        data_seconds=data_seconds,
        predictions=preds,
    )
