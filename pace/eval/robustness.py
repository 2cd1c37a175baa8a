"""Robustness sets: the 200-class subsets of ImageNet-A and ImageNet-R, and ImageNet-C's corruption errors.

ImageNet-A/R hold 200 of the 1000 ImageNet classes; a 1000-class model is scored on them with the other logits
masked (timm's `--valid-labels`), using the class lists timm ships. ImageNet-C samples carry keys
`<corruption>/<severity>/<stem>`; they are scored per corruption and severity, and each corruption's error is
normalised by a baseline model's (AlexNet's, in the ImageNet-C paper) to give the mean corruption error (mCE).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from pace.data import imagenet_classes
from pace.eval.predictions import Predictions
from pace.eval.scoring import score_targets

log = logging.getLogger(__name__)

SUBSETS = {"imagenet_a": "imagenet_a_synsets.txt", "imagenet_r": "imagenet_r_synsets.txt"}
SEVERITIES = (1, 2, 3, 4, 5)


def _read_wnids(text: str, source: str) -> list[str]:
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f"{source}: expected a list of distinct wnids, one per line")
    return wnids


def class_subset(spec: str) -> list[int]:
    """Indices, in timm's ImageNet-1k order, of a class subset.

    Args:
        spec: `imagenet_a` or `imagenet_r` (the 200-wnid lists in `timm/data/_info/`), or a file of ImageNet
            wnids or of class indices (any label space), one per line.

    Raises:
        ValueError: a wnid that is not an ImageNet-1k class, naming it and the source.
    """
    if spec in SUBSETS:
        source = f"timm:data/_info/{SUBSETS[spec]}"
        wnids = _read_wnids((resources.files("timm.data") / "_info" / SUBSETS[spec]).read_text(), source)
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"class_subset={spec!r}: neither {sorted(SUBSETS)} nor a file of wnids")
        source, wnids = str(path), _read_wnids(path.read_text(), str(path))
        if all(w.isdigit() for w in wnids):
            return sorted(int(w) for w in wnids)
    index = {wnid: i for i, wnid in enumerate(imagenet_classes())}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} wnids are not ImageNet-1k classes, e.g. {unknown[0]}")
    return sorted(index[w] for w in wnids)


def corruption_of(key: str) -> tuple[str, int]:
    """The corruption and severity of an ImageNet-C sample key `<corruption>/<severity>/<stem>`.

    Raises:
        ValueError: the key has another form.
    """
    parts = key.split("/")
    if len(parts) < 3 or not parts[1].isdigit():
        raise ValueError(f"sample key {key!r} is not <corruption>/<severity>/<image> (an ImageNet-C layout)")
    return parts[0], int(parts[1])


def score_corruptions(
    preds: Predictions,
    *,
    name: str,
    topk: Sequence[int] = (1, 5),
    baseline_errors: Mapping[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, int]]:
    """Metrics per corruption and severity, and the corruption errors against a baseline.

    `<name>/<c>/s<s>/top1` is the accuracy at one severity; `<name>/<c>/top1` its mean over severities;
    `<name>/<c>/ce` = 100 x mean top-1 error over severities 1-5 / the baseline's (percent), defined only when
    all five severities are present; `<name>/mce` is the mean of those over the corruptions that have one, and
    `<name>/top1`, `nll`, `ece` cover all samples.

    Args:
        preds: canonical predictions keyed `<corruption>/<severity>/<stem>`.
        name: the metric group.
        topk: the top-k accuracies to report.
        baseline_errors: corruption -> the baseline's top-1 error in percent, averaged over the 5 severities.
    """
    baseline = dict(baseline_errors or {})
    groups: dict[tuple[str, int], list[int]] = {}
    for i, key in enumerate(preds.keys):
        groups.setdefault(corruption_of(key), []).append(i)
    overall = score_targets(preds, topk)
    metrics = {f"{name}/{k}": v for k, v in overall.metrics().items()}
    counts = {"samples": len(preds), **{f"{name}/{k}": v for k, v in overall.counts().items()}}
    corruptions = sorted({c for c, _ in groups})
    errors = []
    for corruption in corruptions:
        top1 = {}
        for severity in sorted(s for c, s in groups if c == corruption):
            score = score_targets(preds.select(groups[corruption, severity]), topk)
            prefix = f"{name}/{corruption}/s{severity}"
            metrics.update({f"{prefix}/{k}": v for k, v in score.metrics().items() if k.startswith("top")})
            counts.update({f"{prefix}/{k}": v for k, v in score.counts().items() if k.startswith("top")})
            top1[severity] = score.metrics().get("top1", math.nan)
        metrics[f"{name}/{corruption}/top1"] = sum(top1.values()) / len(top1)
        counts[f"{name}/{corruption}/top1"] = sum(len(groups[corruption, s]) for s in top1)
        if corruption not in baseline:
            continue
        if tuple(sorted(top1)) != SEVERITIES:
            log.warning("%s/%s: severities %s, not 1-5; no corruption error", name, corruption, sorted(top1))
            continue
        error = sum(100.0 - a for a in top1.values()) / len(top1)
        metrics[f"{name}/{corruption}/ce"] = 100.0 * error / baseline[corruption]
        counts[f"{name}/{corruption}/ce"] = counts[f"{name}/{corruption}/top1"]
        errors.append(metrics[f"{name}/{corruption}/ce"])
    if errors:
        metrics[f"{name}/mce"] = sum(errors) / len(errors)
        counts[f"{name}/mce"] = len(errors)  # the number of corruptions averaged
        missing = sorted(set(baseline) - set(corruptions))
        if missing:
            log.warning("%s: mCE over %d of %d corruptions (missing %s)", name, len(errors), len(baseline), missing)
    return metrics, counts
