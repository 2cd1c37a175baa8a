"""Top-k accuracy of keyed predictions against the samples' own labels or against label sets (ImageNet-ReaL).

Every score carries the number of samples it was computed on, so partial or filtered evaluations are visible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pace.eval.calibration import ECE_BINS, expected_calibration_error
from pace.eval.labels import LabelSets
from pace.eval.predictions import Predictions


@dataclass
class Score:
    """Correct counts of one metric group (e.g. `val` or `real`).

    Args:
        count: samples scored (labelled samples; for label sets, samples with a non-empty set).
        correct: k -> samples whose top-k predictions hold a correct class.
        excluded: samples left out (unlabelled, or an empty label set).
        loss_sum: summed cross-entropy over the scored samples, when defined.
        ece: expected calibration error of the top-1 confidences (percent, 15 bins), when known.
    """

    count: int
    correct: dict[int, int]
    excluded: int = 0
    loss_sum: float | None = None
    ece: float | None = None

    def metrics(self) -> dict[str, float]:
        """Percent accuracies `top{k}`, the mean `loss` (the NLL, under both names) and `ece`; empty when nothing
        was scored."""
        if self.count == 0:
            return {}
        out = {f"top{k}": 100.0 * c / self.count for k, c in self.correct.items()}
        if self.loss_sum is not None:
            out["loss"] = out["nll"] = self.loss_sum / self.count
        if self.ece is not None:
            out["ece"] = self.ece
        return out

    def counts(self) -> dict[str, int]:
        """The count behind each metric, plus `excluded` and the correct counts `top{k}_correct`."""
        out = dict.fromkeys(self.metrics(), self.count)
        out.update({f"top{k}_correct": c for k, c in self.correct.items()})
        out["excluded"] = self.excluded
        return out


def _usable_k(topk: Sequence[int], preds: Predictions) -> list[int]:
    for k in topk:
        if k > preds.topk.shape[1] and k <= preds.num_classes:
            raise ValueError(f"top-{k} asked for but only the top-{preds.topk.shape[1]} classes were kept per sample")
    # Top-k for k >= the number of classes is trivially 100%; it is not reported.
    return [k for k in topk if k < preds.num_classes or k == 1]


def score_targets(preds: Predictions, topk: Sequence[int] = (1, 5)) -> Score:
    """Accuracy against the samples' own labels; unlabelled samples are excluded and counted.

    Args:
        preds: canonical predictions (unique keys).
        topk: which top-k accuracies to report.

    Raises:
        ValueError: naming a sample whose label is not a valid class of the model.
    """
    labelled = preds.targets >= 0
    bad = (preds.targets >= preds.num_classes).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"class-count mismatch: sample {preds.keys[i]!r} has label {int(preds.targets[i])} but the model "
            f"produces {preds.num_classes} logits ({len(bad)} samples affected)"
        )
    targets, topk_pred = preds.targets[labelled], preds.topk[labelled]
    correct = {k: int((topk_pred[:, :k] == targets[:, None]).any(dim=1).sum()) for k in _usable_k(topk, preds)}
    # float64 summation in key order: the same total for any split of the samples over ranks.
    losses = preds.loss[labelled].double()
    # Scores without a probability model (k-NN votes) carry NaN losses and no confidences.
    loss_sum = None if len(losses) and bool(losses.isnan().all()) else math.fsum(losses.tolist())
    ece = None
    if preds.confidence is not None:
        top1 = topk_pred[:, 0] == targets
        ece = 100.0 * expected_calibration_error(preds.confidence[labelled], top1, ECE_BINS)
    count = int(labelled.sum())
    return Score(count=count, correct=correct, excluded=len(preds) - count, loss_sum=loss_sum, ece=ece)


def score_label_sets(preds: Predictions, label_sets: LabelSets, topk: Sequence[int] = (1, 5)) -> Score:
    """Accuracy against a set of acceptable classes per key (ImageNet-ReaL): a top-k hit anywhere in the set counts.

    Samples with an empty set are excluded and counted.

    Args:
        preds: canonical predictions (unique keys).
        label_sets: the acceptable classes per key.
        topk: which top-k accuracies to report.

    Raises:
        ValueError: a key is not valid for these label sets (e.g. not an ImageNet val stem for ReaL), or the
            label sets name classes the model does not have.
        KeyError: a key has no entry in the label sets.
    """
    # Keys first: a key that does not belong to these label sets is the more basic mistake.
    accepted_sets = [label_sets.lookup(key) for key in preds.keys]
    if label_sets.max_class >= preds.num_classes:
        raise ValueError(
            f"class-count mismatch: the {label_sets.name!r} label sets name class {label_sets.max_class} but the "
            f"model produces {preds.num_classes} logits"
        )
    ks = _usable_k(topk, preds)
    correct = dict.fromkeys(ks, 0)
    excluded = 0
    for accepted, row in zip(accepted_sets, preds.topk.tolist()):
        if not accepted:
            excluded += 1
            continue
        for k in ks:
            correct[k] += any(c in accepted for c in row[:k])
    return Score(count=len(preds) - excluded, correct=correct, excluded=excluded)


def score_predictions(
    preds: Predictions,
    *,
    topk: Sequence[int] = (1, 5),
    name: str | None = "val",
    label_sets: Mapping[str, LabelSets] | None = None,
) -> tuple[dict[str, float], dict[str, int]]:
    """All metrics of canonical predictions, as `<group>/<metric>` values and the counts behind them.

    Args:
        preds: canonical predictions (unique keys).
        topk: the top-k accuracies to report.
        name: metric group of the samples' own labels; None does not score them.
        label_sets: metric group -> label sets scored by key.

    Returns:
        `metrics` (`val/top1`, `val/loss`, `real/top1`, ...) and `counts` (the same keys, plus `samples`,
        `<group>/excluded` and `<group>/top{k}_correct`).
    """
    scores = {name: score_targets(preds, topk)} if name is not None else {}
    for group, sets in (label_sets or {}).items():
        scores[group] = score_label_sets(preds, sets, topk)
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {"samples": len(preds)}
    for group, score in scores.items():
        metrics.update({f"{group}/{k}": v for k, v in score.metrics().items()})
        counts.update({f"{group}/{k}": v for k, v in score.counts().items()})
    return metrics, counts
