"""Per-sample predictions: the unit that is gathered across ranks, checked, scored, written and re-scored."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

UNLABELLED = -1  # target of a sample that carries no original label (e.g. a flat val folder without a label file)


@dataclass
class Predictions:
    """Predictions for a set of samples, one row per sample.

    Args:
        keys: the samples' keys (file stems such as `ILSVRC2012_val_00000001`).
        topk: (N, k) int64 class indices, best first.
        targets: (N,) int64 original labels; `UNLABELLED` (-1) where a sample has none.
        loss: (N,) float32 per-sample cross-entropy against `targets` (NaN where unlabelled).
        num_classes: the number of logits the model produced.
        logits: optional (N, num_classes) float32 logits.
        confidence: optional (N,) float32 softmax probability of the top-1 class (for calibration).
    """

    keys: list[str]
    topk: torch.Tensor
    targets: torch.Tensor
    loss: torch.Tensor
    num_classes: int
    logits: torch.Tensor | None = None
    confidence: torch.Tensor | None = None

    def __post_init__(self):
        n = len(self.keys)
        rows = {"topk": self.topk.shape[0], "targets": self.targets.shape[0], "loss": self.loss.shape[0]}
        for name in ("logits", "confidence"):
            if getattr(self, name) is not None:
                rows[name] = getattr(self, name).shape[0]
        if any(r != n for r in rows.values()):
            raise ValueError(f"predictions for {n} keys have mismatched rows: {rows}")

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, index: list[int] | torch.Tensor) -> Predictions:
        """The rows at `index`, in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Predictions(
            keys=[self.keys[i] for i in index.tolist()],
            topk=self.topk[index],
            targets=self.targets[index],
            loss=self.loss[index],
            num_classes=self.num_classes,
            logits=None if self.logits is None else self.logits[index],
            confidence=None if self.confidence is None else self.confidence[index],
        )

    def cpu(self) -> Predictions:
        """A copy with every tensor on the CPU."""
        return Predictions(
            keys=self.keys,
            topk=self.topk.cpu(),
            targets=self.targets.cpu(),
            loss=self.loss.cpu(),
            num_classes=self.num_classes,
            logits=None if self.logits is None else self.logits.cpu(),
            confidence=None if self.confidence is None else self.confidence.cpu(),
        )

    @staticmethod
    def concat(parts: list[Predictions]) -> Predictions:
        """Rows of all `parts`, in order (e.g. one part per rank)."""
        if not parts:
            raise ValueError("no predictions to concatenate")
        num_classes = {p.num_classes for p in parts}
        if len(num_classes) != 1:
            raise ValueError(f"parts disagree on the number of classes: {sorted(num_classes)}")
        with_logits = [p.logits is not None for p in parts]
        with_confidence = [p.confidence is not None for p in parts]
        return Predictions(
            keys=[k for p in parts for k in p.keys],
            topk=torch.cat([p.topk for p in parts]),
            targets=torch.cat([p.targets for p in parts]),
            loss=torch.cat([p.loss for p in parts]),
            num_classes=parts[0].num_classes,
            logits=torch.cat([p.logits for p in parts]) if all(with_logits) else None,
            confidence=torch.cat([p.confidence for p in parts]) if all(with_confidence) else None,
        )


def canonicalise(preds: Predictions, *, allow_partial: bool = False) -> tuple[Predictions, int]:
    """Sort by key, and refuse (or, for partial evaluation, drop) samples seen more than once.

    Sorting makes every later step independent of how samples were split over ranks and workers.

    Args:
        preds: gathered predictions in any order.
        allow_partial: drop repeated keys (keeping the first occurrence) with a warning instead of raising;
            repeats are what a loader that pads ranks to equal length produces.

    Returns:
        The sorted, unique predictions and the number of rows dropped as repeats.

    Raises:
        ValueError: a key occurs more than once and `allow_partial` is False; the message names the keys.
    """
    first: dict[str, int] = {}
    for i, key in enumerate(preds.keys):
        first.setdefault(key, i)
    dropped = len(preds) - len(first)
    if dropped:
        counts = Counter(preds.keys)
        repeated = sorted(k for k, c in counts.items() if c > 1)
        shown = ", ".join(f"{k} (x{counts[k]})" for k in repeated[:5])
        message = f"{dropped} samples repeat a key already evaluated, e.g. {shown}"
        if not allow_partial:
            raise ValueError(message + "; each sample must be evaluated exactly once across ranks and workers")
        log.warning("%s; keeping the first occurrence of each (partial evaluation)", message)
    order = sorted(first, key=lambda k: k)
    return preds.select([first[k] for k in order]), dropped


def _open(path: Path, mode: str, *, compressed: bool):
    # `.gz` keeps a 50,000 x 1,000 logits file to a sensible size.
    return gzip.open(path, mode + "t", encoding="utf-8") if compressed else open(path, mode, encoding="utf-8")


def write_predictions(path: str | Path, preds: Predictions) -> Path:
    """Write one JSON object per sample: key, target, top-k, loss, and logits when present.

    Args:
        path: a `.jsonl` (or `.jsonl.gz`) file; parent folders are created.
        preds: the predictions to write, usually canonical (sorted by key).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _open(tmp, "w", compressed=path.suffix == ".gz") as f:
        for i, key in enumerate(preds.keys):
            row = {
                "key": key,
                "target": int(preds.targets[i]),
                "topk": preds.topk[i].tolist(),
                "loss": float(preds.loss[i]),
                "num_classes": preds.num_classes,
            }
            if preds.confidence is not None:
                row["confidence"] = float(preds.confidence[i])
            if preds.logits is not None:
                row["logits"] = preds.logits[i].tolist()
            f.write(json.dumps(row, allow_nan=True) + "\n")
    tmp.replace(path)
    return path


def read_predictions(path: str | Path) -> Predictions:
    """Read a file written by `write_predictions`.

    Raises:
        ValueError: naming the file and line of a malformed row.
    """
    path = Path(path)
    keys, topk, targets, loss, logits, confidence, num_classes = [], [], [], [], [], [], set()
    with _open(path, "r", compressed=path.suffix == ".gz") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                keys.append(str(row["key"]))
                topk.append([int(c) for c in row["topk"]])
                targets.append(int(row["target"]))
                loss.append(float(row.get("loss", float("nan"))))
                num_classes.add(int(row["num_classes"]))
                if "logits" in row:
                    logits.append(row["logits"])
                if "confidence" in row:
                    confidence.append(float(row["confidence"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: malformed prediction row ({e!r})") from None
    if len(num_classes) > 1:
        raise ValueError(f"{path}: rows disagree on num_classes: {sorted(num_classes)}")
    if logits and len(logits) != len(keys):
        raise ValueError(f"{path}: {len(logits)} of {len(keys)} rows carry logits; expected all or none")
    if confidence and len(confidence) != len(keys):
        raise ValueError(f"{path}: {len(confidence)} of {len(keys)} rows carry a confidence; expected all or none")
    if len({len(t) for t in topk}) > 1:
        raise ValueError(f"{path}: rows carry different numbers of top-k classes")
    return Predictions(
        keys=keys,
        topk=torch.tensor(topk, dtype=torch.long).reshape(len(keys), -1),
        targets=torch.tensor(targets, dtype=torch.long),
        loss=torch.tensor(loss, dtype=torch.float32),
        num_classes=num_classes.pop() if num_classes else 0,
        logits=torch.tensor(logits, dtype=torch.float32) if logits else None,
        confidence=torch.tensor(confidence, dtype=torch.float32) if confidence else None,
    )
