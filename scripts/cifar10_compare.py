"""PACE-ViT-T/4 against a softmax ViT of equal parameter count on CIFAR-10: same recipe, budget and seeds.

Variants (``experiment=cifar10`` plus the overrides below, run one after another, each under ``timeout``):

* ``pace_full``      PACE-ViT-T/4, the paper's Compress (full projector), sketch redrawn per epoch;
* ``pace_diag``      the authors' Compress (diagonal form), sketch redrawn per epoch;
* ``pace_diag_ref``  the authors' Compress with the authors' sketch schedule (``sketch_schedule=reference``: one
  sketch in epoch 0, then a fresh one every step), evaluated with the fixed evaluation sketch;
* ``vit``            timm's ViT with 4 px patches, width 144, depth 6, 4 heads (1.52 M parameters, as PACE-ViT-T/4).

Each run's last evaluation (top-1, top-5 on the test split given by the shards) goes into ``results.json`` and a
Markdown table of mean ± sample std, min and max over seeds::

    python scripts/cifar10_compare.py --data data/cifar10 --out runs/cifar10_compare \\
        --updates 20 --epochs 2 --seeds 0 1          # about 1.5 h on a shared 2-core CPU
    # longer (e.g. on a GPU): --updates 0 (whole epochs) --epochs 100 --extra trainer=default

Runs already finished under ``--out`` are read back, not repeated, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "pace_full": ["+model.kwargs.compress_form=full"],
    "pace_diag": ["+model.kwargs.compress_form=diag"],
    "pace_diag_ref": ["+model.kwargs.compress_form=diag", "+model.kwargs.sketch_schedule=reference"],
    "vit": [
        "model=vit_tiny_p4",
        "+model.kwargs.embed_dim=144",
        "+model.kwargs.depth=6",
        "+model.kwargs.num_heads=4",
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 webdataset shards (train and test splits)")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar10_compare"), help="one run dir per variant/seed")
    parser.add_argument("--updates", type=int, default=20, help="updates per epoch (0: whole epochs)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs (the first is warm-up)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run before it is stopped")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    return parser.parse_args(argv)


def _last_eval(run_dir: Path) -> dict[str, float] | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val/top1" in r]
    return evals[-1] if evals else None


def _run(args: argparse.Namespace, variant: str, seed: int) -> dict[str, float] | None:
    run_dir = args.out / f"{variant}_s{seed}"
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = [
        "experiment=cifar10",
        f"data.root={args.data}",
        f"name={variant}_s{seed}",
        f"hydra.run.dir={run_dir}",
        f"seed={seed}",
        f"sched.epochs={args.epochs}",
        f"eval.val.every_n_epochs={args.epochs}",
        f"trainer.limit_train_batches={args.updates or 'null'}",
        *VARIANTS[variant],
        *args.extra,
    ]
    cmd = ["timeout", str(args.timeout), sys.executable, "-m", "pace.train.main", *overrides]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, check=False)
    result = _last_eval(run_dir)
    if proc.returncode != 0 or result is None:
        print(f"{variant} seed {seed}: exit code {proc.returncode}, no final evaluation", file=sys.stderr)
        return None
    done.write_text(json.dumps(result))
    return result


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{mean:.2f} ± {std:.2f} ({min(values):.2f}–{max(values):.2f})"


def table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    """Markdown table: per variant, top-1 and top-5 as mean ± std (min–max) over seeds, and the seeds' top-1."""
    lines = ["| variant | seeds | top-1 % | top-5 % | top-1 per seed |", "|---|---|---|---|---|"]
    for variant, by_seed in results.items():
        if not by_seed:
            continue
        top1 = [r["val/top1"] for r in by_seed.values()]
        top5 = [r["val/top5"] for r in by_seed.values()]
        per_seed = ", ".join(f"{s}: {r['val/top1']:.2f}" for s, r in sorted(by_seed.items()))
        lines.append(f"| {variant} | {len(top1)} | {_fmt(top1)} | {_fmt(top5)} | {per_seed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict[str, float]]] = {v: {} for v in args.variants}
    # Seed-major order: a comparison stopped early still has every variant at the first seed.
    for seed in args.seeds:
        for variant in args.variants:
            result = _run(args, variant, seed)
            if result is not None:
                results[variant][seed] = result
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0 if all(len(r) == len(args.seeds) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
