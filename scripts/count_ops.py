"""ATen ops, bytes moved and matrix FLOPs of one PACE block and of one training step, under bf16 autocast.

The CPU-side proxy of GPU cost (see ``scripts/_op_counter.py``): each case runs forward + backward (a random
cotangent for a block, cross-entropy for a model) at two small batches, checks that the op count does not depend
on the batch and that a third batch lies on the line through the first two, and extrapolates bytes and FLOPs to
``--target-batch``. The optimizer step is not included. Models count the path a GPU takes (the fused mixer).
Writes ``count_ops.json`` under ``--out`` when given.

    python scripts/count_ops.py                                   # S block (both paths) + timm Block, B = 128
    python scripts/count_ops.py --model pace_vit_small_patch16_224 --model deit_small_patch16_224
    python scripts/count_ops.py --by-op                           # per-op table of every block case
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _op_counter import OpCount, count_ops, extrapolate
from timm.models.vision_transformer import Block
from torch import nn

import pace  # noqa: F401  (registers the pace_vit_* models with timm)
from pace.layers import PACEAttention, PACEBlock

GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--forms", default="full,diag", help="Compress forms of the PACE block cases")
    parser.add_argument("--batches", default="2,4,6", help="two batches to extrapolate from, a third to check")
    parser.add_argument("--target-batch", type=int, default=128)
    parser.add_argument("--model", action="append", default=[], help="timm model of a training-step case")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--no-blocks", action="store_true", help="only the model cases")
    parser.add_argument("--by-op", action="store_true", help="print the per-op table of each case")
    parser.add_argument("--out", type=Path, default=None, help="write count_ops.json here")
    return parser.parse_args(argv)


def block_step(block: nn.Module, batch: int, *, args: argparse.Namespace):
    x = torch.randn(batch, args.tokens, args.dim, requires_grad=True)
    grad = torch.randn(batch, args.tokens, args.dim)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x)
        y.backward(grad)

    return step


def model_step(model: nn.Module, batch: int, *, args: argparse.Namespace):
    images = torch.randn(batch, 3, args.img_size, args.img_size)
    labels = torch.randint(model.num_classes, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()

    return step


def measure(name: str, make_step, batches: list[int], target: int) -> tuple[dict, OpCount]:
    """Count one case at three batches; extrapolate from the first two, check the third against the line."""
    counts = []
    for b in batches:
        step = make_step(b)
        step()  # first call draws sketches and warms caches: not counted
        counts.append(count_ops(step))
    line = extrapolate(counts[0], counts[1], batches[0], batches[1], target)
    check = extrapolate(counts[0], counts[1], batches[0], batches[1], batches[2])
    linear_err = abs(check["bytes"] - counts[2].bytes) / counts[2].bytes
    row = {
        "case": name,
        "ops": line["ops"],
        "gbytes": line["bytes"] / GB,
        "gflop": line["flops"] / GB,
        "batch": target,
        "linearity_error": linear_err,
        "ops_at_third_batch": counts[2].ops,
        "by_category_gbytes": _by_category(counts[0], counts[1], batches[0], batches[1], target),
    }
    return row, counts[0]


def _by_category(small: OpCount, large: OpCount, b_small: int, b_large: int, target: int) -> dict:
    # {category: (ops, GB at the target batch)}, each category's bytes extrapolated on its own line.
    lo, hi = small.by("category"), large.by("category")
    t = (target - b_small) / (b_large - b_small)
    return {k: (v[0], (v[1] + t * (hi.get(k, v)[1] - v[1])) / GB) for k, v in lo.items()}


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<44} {'ops':>6} {'GB':>8} {'GFLOP':>9} {'batch':>6} {'lin.err':>8}")
    for r in rows:
        print(
            f"{r['case']:<44} {r['ops']:>6} {r['gbytes']:>8.3f} {r['gflop']:>9.1f} {r['batch']:>6} "
            f"{r['linearity_error']:>8.1e}"
        )


def print_by(count: OpCount, key: str, scale: float) -> None:
    for k, (n, nbytes, flops) in count.by(key).items():
        print(f"    {k:<36} {n:>5} {nbytes * scale / GB:>8.3f} GB {flops * scale / GB:>9.2f} GFLOP")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    if len(batches) != 3 or len(set(batches)) != 3:
        raise SystemExit(f"--batches needs three distinct batches, got {args.batches!r}")
    cases = []
    if not args.no_blocks:
        kw = {"rank": args.rank}
        for form in args.forms.split(","):
            for fused in (True, False):
                label = f"PACEBlock {form} {'fused' if fused else 'unfused'}"
                attn = partial(PACEAttention, compress_form=form, fused=fused, **kw)
                factory = partial(PACEBlock, args.dim, args.heads, attn_layer=attn)
                cases.append((label, factory, "block"))
        cases.append(("timm Block (SDPA + MLP)", lambda: Block(args.dim, args.heads, qkv_bias=True), "block"))
    for name in args.model:
        cases.append((f"{name} train step", lambda n=name: timm.create_model(n, img_size=args.img_size), "model"))
    rows = []
    for label, factory, kind in cases:
        module = factory()
        module.train()
        for attn in module.modules():
            if isinstance(attn, PACEAttention) and attn.fused is None:
                attn.fused = True  # count the path a GPU takes (fused=None picks the separate operators on a CPU)
        make = partial(block_step if kind == "block" else model_step, module, args=args)
        row, first = measure(label, make, batches, args.target_batch)
        rows.append(row)
        if args.by_op:
            print(f"{label}, extrapolated per-op bytes at batch {args.target_batch} (scaled from batch {batches[0]}):")
            print_by(first, "name", args.target_batch / batches[0])
        print(f"{label}: by category at batch {args.target_batch}:", file=sys.stderr)
        for k, (n, gb) in row["by_category_gbytes"].items():
            print(f"    {k:<28} {n:>4} ops {gb:>7.3f} GB", file=sys.stderr)
    print_table(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "count_ops.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
