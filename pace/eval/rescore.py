"""Score a per-sample predictions file again, e.g. against other label sets, without running the model.

python -m pace.eval.rescore predictions_imagenet.jsonl.gz --labels val=targets real=imagenet_real
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from pace.data.make_shards import parse_pairs
from pace.eval.classify import check_sample_count
from pace.eval.evaluators import resolve_labels
from pace.eval.predictions import canonicalise, read_predictions
from pace.eval.report import format_table
from pace.eval.scoring import score_predictions

DEFAULT_LABELS = {"val": "targets", "real": "imagenet_real"}


def rescore(
    path: str | Path,
    *,
    labels: Mapping[str, str] | None = None,
    topk: Sequence[int] = (1, 5),
    expected_samples: int | None = None,
    allow_partial: bool = False,
) -> dict:
    """Metrics and counts of a predictions file written by `pace-eval` (or `evaluate(predictions_path=...)`).

    Args:
        path: the `.jsonl` / `.jsonl.gz` predictions file.
        labels: metric group -> `targets`, `imagenet_real` or a label-set JSON (default: val + ReaL).
        topk: the top-k accuracies to report (at most the number of classes kept per sample).
        expected_samples: the number of samples the file must hold.
        allow_partial: accept another count, and drop repeated keys, with warnings.

    Returns:
        `{"metrics": {...}, "counts": {...}}` as in the results JSON.
    """
    preds, dropped = canonicalise(read_predictions(path), allow_partial=allow_partial)
    check_sample_count(len(preds), expected_samples, allow_partial=allow_partial, source=str(path))
    targets_name, label_sets = resolve_labels(labels or DEFAULT_LABELS)
    metrics, counts = score_predictions(preds, topk=topk, name=targets_name, label_sets=label_sets)
    counts["repeats_dropped"] = dropped
    return {"metrics": metrics, "counts": counts}


def main(argv: list[str] | None = None) -> dict:
    """Command line: print the table of a re-scored predictions file (and optionally write it as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m pace.eval.rescore", description=__doc__.splitlines()[0])
    parser.add_argument("predictions", help="a .jsonl or .jsonl.gz predictions file")
    parser.add_argument(
        "--labels",
        nargs="+",
        default=[f"{k}={v}" for k, v in DEFAULT_LABELS.items()],
        help="group=source pairs; source is targets, imagenet_real or a label-set JSON file",
    )
    parser.add_argument("--topk", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--num-samples", type=int, default=None, help="the number of samples the file must hold")
    parser.add_argument("--partial", action="store_true", help="accept another count and repeated keys")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        labels = parse_pairs(args.labels, "--labels", "GROUP=SOURCE (e.g. real=imagenet_real)")
    except ValueError as exn:
        raise SystemExit(str(exn)) from None
    result = rescore(
        args.predictions,
        labels=labels,
        topk=args.topk,
        expected_samples=args.num_samples,
        allow_partial=args.partial,
    )
    print(format_table({Path(args.predictions).name: result}))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
