"""Spread of a PACE model's top-1 over evaluation sketches: the same weights, the same images, N sketch seeds.

Loads a checkpoint once (through `pace.eval.load_model`), reads the first ``--max-images`` images of a shard split
once through the evaluation transform the run used, then evaluates with the model's own sketches and with the
sketches derived from seeds 0 … N−1 (``pace.layers.reseed_sketches``: what ``pace-eval model.sketch_seed=S`` does)::

    python scripts/sketch_spread.py runs/quickstart/checkpoints/best.pt --shards data/generated/shapes --split val \\
        --seeds 10 --out outputs/sketch_spread.json

Prints and writes top-1 per seed, their mean ± sample standard deviation, min and max.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import pace  # noqa: F401  (registers the models)
from pace.analysis.images import shard_images
from pace.data import create_eval_transform
from pace.eval.loading import WEIGHTS, load_model
from pace.eval.transform import eval_data_config
from pace.layers import reseed_sketches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training checkpoint, release folder or authors'-format file")
    parser.add_argument("--model", default=None, help="timm name, when the checkpoint does not name it")
    parser.add_argument("--weights", choices=WEIGHTS, default="auto", help="raw (auto) or EMA weights")
    parser.add_argument("--shards", required=True, help="webdataset shard folder with _info.json")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-images", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=10, help="evaluate with sketch seeds 0 .. N-1")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy (%) of ``model`` in evaluation mode."""
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return 100.0 * correct / len(images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, checkpoint=args.checkpoint, weights=args.weights)
    model = loaded.model
    transform = create_eval_transform(**eval_data_config(model))
    data = shard_images(args.shards, transform=transform, max_images=args.max_images, split=args.split)
    labels = torch.tensor(data.labels)
    own = top1(model, data.images, labels, args.batch_size)
    per_seed = {}
    for seed in range(args.seeds):
        reseed_sketches(model, seed)
        per_seed[seed] = top1(model, data.images, labels, args.batch_size)
        print(f"sketch seed {seed}: top-1 {per_seed[seed]:.2f} %", flush=True)
    values = list(per_seed.values())
    summary = {
        "checkpoint": str(args.checkpoint),
        "weights": loaded.weights,
        "images": data.description,
        "own_sketches_top1": own,
        "per_seed_top1": per_seed,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }
    print(
        f"{loaded.name} ({loaded.weights} weights), {data.description}: own sketches {own:.2f} %; "
        f"{len(values)} sketch seeds {summary['mean']:.2f} ± {summary['std']:.2f} % "
        f"(min {summary['min']:.2f}, max {summary['max']:.2f})"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
