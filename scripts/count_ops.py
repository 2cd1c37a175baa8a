"""ATen ops, bytes moved and matrix FLOPs of one PACE block and of one training step, under bf16 autocast.

The CPU-side proxy of GPU cost (see ``scripts/_op_counter.py``): each case runs forward + backward (a random
cotangent for a block, cross-entropy for a model) at two small batches, checks that the op count does not depend
on the batch and that a third batch lies on the line through the first two, and extrapolates bytes and FLOPs to
``--target-batch``. The optimizer step is not included. Models count the path a GPU takes (the fused mixer).
Writes ``count_ops.json`` under ``--out`` when given. ``pace::`` custom ops (pace.kernels) count by default as one op
that reads its inputs and writes its outputs once, what their Triton kernels move on a GPU (``--kernels fused``);
``--kernels fallback`` counts the ATen ops of their PyTorch fallbacks instead (what the CPU runs).

    python scripts/count_ops.py                                   # S block (both paths) + timm Block, B = 128
    python scripts/count_ops.py --model pace_vit_small_patch16_224 --model deit_small_patch16_224
    python scripts/count_ops.py --by-op                           # per-op table of every block case
    python scripts/count_ops.py --compiled                        # kernels of the regionally compiled blocks
    python scripts/count_ops.py --compile-time pace_vit_small_patch16_224   # compile_blocks: time, graph breaks

``--compiled [cpp|triton]`` counts instead what a block compiled as ``compile_blocks`` does would launch: the
kernels of Inductor's schedule after fusion (generated kernels, and GEMMs and ``pace::`` ops as extern kernels)
with Inductor's byte estimate, read from the scheduling of its C++ (default) or Triton backend on the CPU without
generating code (``scripts/_compiled_counter.py``). ``--compile-time`` compiles a model's blocks for real (the
default Inductor backend of the device, here C++) and times its first training steps against a warm one.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _compiled_counter import BACKENDS, count_compiled, time_compile
from _op_counter import KERNEL_MODES, OpCount, count_ops, extrapolate
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
    parser.add_argument(
        "--batches",
        default="2,4,6",
        help="two batches to extrapolate from and a third to check, or only the target batch (counted directly)",
    )
    parser.add_argument("--target-batch", type=int, default=128)
    parser.add_argument("--model", action="append", default=[], help="timm model of a training-step case")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--no-blocks", action="store_true", help="only the model cases")
    parser.add_argument("--by-op", action="store_true", help="print the per-op table of each case")
    parser.add_argument(
        "--kernels",
        choices=KERNEL_MODES,
        default="fused",
        help="a pace:: custom op counts as one op moving its inputs + outputs once, as its Triton kernel on a GPU "
        "(fused), or as the ATen ops of the PyTorch fallback the CPU runs (fallback)",
    )
    parser.add_argument(
        "--compiled",
        nargs="?",
        const="cpp",
        choices=BACKENDS,
        default=None,
        help="count the kernels of the block compiled by Inductor (the scheduling of its cpp or triton backend) "
        "instead of the eager ops; blocks only",
    )
    parser.add_argument(
        "--compile-time",
        metavar="MODEL",
        default=None,
        help="compile MODEL's blocks (compile_blocks) for real, time its first training steps and count graph breaks",
    )
    parser.add_argument("--compile-batch", type=int, default=2, help="batch of the --compile-time steps")
    parser.add_argument(
        "--eager-first",
        action="store_true",
        help="--compile-time: one eager step before compiling (PACE's sketches drawn and stored outside the graphs)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the cases run (cuda: the eager ops a GPU runs, or with --compiled triton its own schedule)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write count_ops.json here")
    args = parser.parse_args(argv)
    if args.compiled and args.model:
        parser.error("--compiled counts blocks only; drop --model")
    for name in args.model + ([args.compile_time] if args.compile_time else []):
        if not timm.is_model(name):
            parser.error(f"{name!r} is not a timm model (timm.list_models() lists them)")
    if args.compiled and args.kernels == "fallback":
        parser.error(
            "--compiled counts each pace:: op as one extern kernel (Inductor cannot see inside it); "
            "drop --kernels fallback"
        )
    return args


def block_step(block: nn.Module, batch: int, *, args: argparse.Namespace):
    x = torch.randn(batch, args.tokens, args.dim, device=args.device, requires_grad=True)
    grad = torch.randn(batch, args.tokens, args.dim, device=args.device)

    def step() -> None:
        _clear_grads(block, x)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            y = block(x)
        y.backward(grad)

    return step


def _clear_grads(module: nn.Module, *leaves: torch.Tensor) -> None:
    # As optimizer.zero_grad() (set_to_none) between training steps: the next backward writes the gradients
    # instead of accumulating into the previous step's (a full extra read and write of every gradient).
    module.zero_grad(set_to_none=True)
    for t in leaves:
        t.grad = None


def model_step(model: nn.Module, batch: int, *, args: argparse.Namespace):
    images = torch.randn(batch, 3, args.img_size, args.img_size, device=args.device)
    labels = torch.randint(model.num_classes, (batch,), device=args.device)

    def step() -> None:
        _clear_grads(model)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()

    return step


def measure(name: str, make_step, batches: list[int], target: int, counter, mode: str) -> tuple[dict, OpCount]:
    """Count one case at three batches; extrapolate from the first two, check the third against the line.

    With a single batch, count at that batch only (it is the target). ``counter(step)`` returns the ``OpCount`` of
    one call of ``step`` (eager ops, or compiled kernels).
    """
    counts = []
    for b in batches:
        step = make_step(b)
        step()  # first call draws sketches and warms caches: not counted
        counts.append(counter(step))
    row = {"case": name, "kernels": mode, "batch": target}
    if len(batches) == 1:
        by_category = {k: (v[0], v[1] / GB) for k, v in counts[0].by("category").items()}
        row |= {"ops": counts[0].ops, "gbytes": counts[0].bytes / GB, "gflop": counts[0].flops / GB}
        return row | {"linearity_error": None, "by_category_gbytes": by_category}, counts[0]
    line = extrapolate(counts[0], counts[1], batches[0], batches[1], target)
    check = extrapolate(counts[0], counts[1], batches[0], batches[1], batches[2])
    linear_err = abs(check["bytes"] - counts[2].bytes) / counts[2].bytes
    row |= {
        "ops": line["ops"],
        "gbytes": line["bytes"] / GB,
        "gflop": line["flops"] / GB,
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
            + (f"{r['linearity_error']:>8.1e}" if r["linearity_error"] is not None else f"{'direct':>8}")
        )


def print_by(count: OpCount, key: str, scale: float) -> None:
    for k, (n, nbytes, flops) in count.by(key).items():
        print(f"    {k:<36} {n:>5} {nbytes * scale / GB:>8.3f} GB {flops * scale / GB:>9.2f} GFLOP")


def _counter(module: nn.Module, args: argparse.Namespace):
    """``(counter, graphs)``: the per-step counter of ``measure``, and the list it appends forward-graph counts to."""
    graphs: list[int] = []
    if not args.compiled:
        return partial(count_ops, kernels=args.kernels), graphs

    def counter(step) -> OpCount:
        count, forward_graphs = count_compiled(module, step, args.compiled)
        graphs.append(forward_graphs)
        return count

    return counter, graphs


def _compile_time(args: argparse.Namespace) -> dict:
    """Compile ``args.compile_time``'s blocks (compile_blocks), time its first training steps; print and return."""
    model = timm.create_model(args.compile_time, img_size=args.img_size).to(args.device).train()
    step = model_step(model, args.compile_batch, args=args)
    first = "after one eager step" if args.eager_first else "from the first step"
    row = {
        "case": f"{args.compile_time} compile_blocks, compiled {first}",
        "batch": args.compile_batch,
        **time_compile(model, step, eager_first=args.eager_first),
    }
    times = ", ".join(f"{t:.1f}" for t in row["step_s"])
    print(
        f"{row['case']}: steps {times} s; compile time {row['compile_s']:.1f} s (steps minus the warm last one); "
        f"{row['frames']} frames compiled; calls of compiled code per step {row['compiled_calls']}; "
        f"{row['graph_breaks']} graph breaks {row['break_reasons'] or ''}"
    )
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    if batches != [args.target_batch] and (len(batches) != 3 or len(set(batches)) != 3):
        raise SystemExit(f"--batches needs three distinct batches or just --target-batch, got {args.batches!r}")
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
        module = factory().to(args.device)
        module.train()
        for attn in module.modules():
            if isinstance(attn, PACEAttention) and attn.fused is None:
                attn.fused = True  # count the path a GPU takes (fused=None picks the separate operators on a CPU)
        make = partial(block_step if kind == "block" else model_step, module, args=args)
        counter, graphs = _counter(module, args)
        mode = f"compiled ({args.compiled} scheduling)" if args.compiled else args.kernels
        row, first = measure(label, make, batches, args.target_batch, counter, mode)
        if args.compiled:
            row["forward_graphs"] = max(graphs)  # 1 when Dynamo captured the block whole (no graph break)
        rows.append(row)
        if args.by_op:
            how = "counted" if len(batches) == 1 else f"scaled from batch {batches[0]}"
            print(f"{label}, per-op bytes at batch {args.target_batch} ({how}):")
            print_by(first, "name", args.target_batch / batches[0])
        print(f"{label}: by category at batch {args.target_batch}:", file=sys.stderr)
        for k, (n, gb) in row["by_category_gbytes"].items():
            print(f"    {k:<28} {n:>4} ops {gb:>7.3f} GB", file=sys.stderr)
    if rows:
        print_table(rows)
    if args.compile_time:
        rows.append(_compile_time(args))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "count_ops.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
