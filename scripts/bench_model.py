"""Model benchmark: training and inference throughput of PACE-ViT against DeiT at the same batch size.

For each pair (``pace_vit_tiny_patch16_224`` / ``deit_tiny_patch16_224``, ``pace_vit_small_patch16_224`` /
``deit_small_patch16_224``), each image size (224, 384 and 512 px: 196, 576 and 1,024 tokens) and each mode,
both models run interleaved in this one process on synthetic data:

* training: forward, cross-entropy on random labels, backward and an AdamW step;
* inference: a forward in evaluation mode without gradients;

eagerly and under ``torch.compile`` (on a CPU, where Inductor takes minutes per model, only a subset by
default); float32 on a CPU, bf16 autocast on a GPU. Images per second come from the median step time (on a CPU
also images per CPU-second, which a busy shared machine disturbs less at one thread); analytic FLOPs per image
(matrix products, convolutions, triangular solves and Cholesky, counted by ``FlopCounterMode``) stand beside
them, and on a GPU the peak memory of a step. Writes ``results.csv``, ``summary.json`` and ``report.md`` under
``--out``.

    python scripts/bench_model.py --out outputs/bench_model                     # CPU, about 8 minutes on 2 cores
    python scripts/bench_model.py --threads 1 --compile eager --out outputs/bench_model_1t   # one thread, eager
    python scripts/bench_model.py --device cuda --out outputs/bench_model_gpu  # GPU: bf16, every size compiled
    python scripts/bench_model.py --quick --out outputs/bench_quick             # smoke run
"""

import argparse
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _bench_utils import (
    MIB,
    autocast,
    command_line,
    flop_counter,
    format_checks,
    interleaved,
    machine_info,
    markdown_table,
    median_ms,
    peak_memory_bytes,
    pick_device,
    write_results,
)
from torch import nn

import pace  # noqa: F401  (registers the pace_vit_* models with timm)
from pace.models import compile_blocks

PAIRS = "pace_vit_tiny_patch16_224:deit_tiny_patch16_224,pace_vit_small_patch16_224:deit_small_patch16_224"
GRAD_TOLERANCE = 0.05  # compiled vs eager under bf16 autocast: reordered sums, not a different model
TRAIN_TARGET_GPU = 1.5  # PACE-ViT-S / DeiT-S training throughput at 224 px, bf16, compiled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (bf16 autocast on cuda)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--pairs", default=PAIRS, help="comma-separated ours:baseline timm model names")
    parser.add_argument("--sizes", default="224,384,512", help="image sizes")
    parser.add_argument("--batch", default=None, help="batch per size (default: CPU 4,2,1; GPU 128,64,32)")
    parser.add_argument("--modes", default="train,infer", help="train and/or infer")
    parser.add_argument("--compile", default=None, help="eager and/or compiled (default: both)")
    # Inductor takes minutes per model on a 2-core CPU, so there the compiled runs default to a subset.
    parser.add_argument("--compile-sizes", default=None, help="sizes that also run compiled (CPU default 224)")
    parser.add_argument("--compile-modes", default=None, help="modes that also run compiled (CPU default infer)")
    parser.add_argument("--compile-pairs", default=None, help="our models that also run compiled (CPU: first)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    parser.add_argument("--regional", action="store_true", help="compile each block in place, not the whole model")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per model (CPU 5, GPU 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (CPU 1, GPU 5; compiled 3+)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="test-size models, one small image size")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_model"), help="output directory")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.quick:
        args.pairs = "pace_vit_test:test_vit"
        args.sizes, args.batch = "64", "2"
        args.repeats, args.warmup, args.num_classes = 2, 1, 10
        args.compile = args.compile or "eager"
        args.threads = args.threads or 1
    args.pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    for pair in args.pairs:
        if len(pair) != 2:
            parser.error(f"--pairs entries must be ours:baseline, got {':'.join(pair)!r}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    default_batch = {224: 128, 384: 64, 512: 32} if gpu else {224: 4, 384: 2, 512: 1}
    batches = [int(b) for b in args.batch.split(",")] if args.batch else [default_batch.get(s, 1) for s in args.sizes]
    if len(batches) != len(args.sizes):
        parser.error(f"--batch has {len(batches)} entries for {len(args.sizes)} sizes")
    args.batch = dict(zip(args.sizes, batches))
    args.modes = args.modes.split(",")
    args.compile = (args.compile or "eager,compiled").split(",")
    compile_sizes = args.compile_sizes or (",".join(map(str, args.sizes)) if gpu else "224")
    args.compile_sizes = {int(s) for s in compile_sizes.split(",")}
    args.compile_modes = set((args.compile_modes or (",".join(args.modes) if gpu else "infer")).split(","))
    compile_pairs = args.compile_pairs or ",".join(p[0] for p in (args.pairs if gpu else args.pairs[:1]))
    args.compile_pairs = set(compile_pairs.split(","))
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    return args


def build(name: str, size: int, num_classes: int, device: torch.device) -> nn.Module:
    """A timm model for ``size`` px (DeiT gets a position table for that grid; PACE-ViT needs none)."""
    return timm.create_model(name, img_size=size, num_classes=num_classes).to(device)


def train_step(model: nn.Module, images, labels, device: torch.device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()

    def step() -> None:
        with autocast(device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def loss_gradients(model: nn.Module, images, labels, device: torch.device) -> list[torch.Tensor]:
    """The float32 gradients of one training step's loss, in parameter order (no optimizer step).

    Copies: under CUDA graphs a gradient may live in the graph's memory pool, which the next replay overwrites.
    """
    model.train()
    with autocast(device):
        logits = model(images)
    F.cross_entropy(logits.float(), labels).backward()
    grads = [
        torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.to(torch.float32, copy=True)
        for p in model.parameters()
    ]
    model.zero_grad(set_to_none=True)
    return grads


def gradient_disagreement(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """The largest ``‖g_other − g_ref‖ / ‖g_ref‖`` over the parameters (the norm is clamped at 1e-12).

    A compiled graph can train something other than the model (torch 2.11's Dynamo once dropped the fused PACE
    mixer's gradient: every block parameter got zero, a disagreement of 1); its throughput would then be meaningless.
    """
    return max(((o - r).norm() / r.norm().clamp_min(1e-12)).item() for r, o in zip(reference, other, strict=True))


def infer_step(model: nn.Module, images, device: torch.device):
    model.eval()

    @torch.no_grad()
    def step() -> None:
        with autocast(device):
            model(images)

    return step


def gflops_per_image(model: nn.Module, size: int, mode: str, device: torch.device, num_classes: int) -> float:
    """GFLOPs (matrix products, convolutions, solves) of one image's forward (inference) or forward+backward."""
    images = torch.randn(1, 3, size, size, device=device)
    was_training = model.training
    model.train(mode == "train")
    with flop_counter() as counter:
        if mode == "train":
            F.cross_entropy(model(images), torch.zeros(1, dtype=torch.long, device=device)).backward()
        else:
            with torch.no_grad():
                model(images)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def compile_model(model: nn.Module, args) -> nn.Module:
    """``torch.compile`` in ``--compile-mode``: the whole model, or with ``--regional`` each block in place."""
    mode = None if args.compile_mode == "default" else args.compile_mode
    if not args.regional:
        return torch.compile(model, mode=mode, backend=args.compile_backend)
    compile_blocks(
        model, mode=mode, backend=args.compile_backend
    )  # PACE-ViT: its PACE and class-attention blocks; DeiT: its blocks
    return model


def run_case(args, device, pair, size: int, mode: str, compiled: bool) -> list[dict]:
    """Both models of ``pair`` at one size, mode and compilation, interleaved."""
    batch = args.batch[size]
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, args.num_classes, (batch,), device=device)
    models = {name: build(name, size, args.num_classes, device) for name in pair}
    flops = {name: gflops_per_image(m, size, mode, device, args.num_classes) for name, m in models.items()}
    # Compiled training is checked against eager gradients first (same batch, sketches and weights).
    check = compiled and mode == "train"
    reference = {name: loss_gradients(m, images, labels, device) for name, m in models.items()} if check else {}
    runnable = {name: compile_model(m, args) if compiled else m for name, m in models.items()}
    disagreement = {
        name: gradient_disagreement(reference[name], loss_gradients(runnable[name], images, labels, device))
        for name in reference
    }
    steps = {
        name: train_step(m, images, labels, device) if mode == "train" else infer_step(m, images, device)
        for name, m in runnable.items()
    }
    # A compiled PACE model compiles again once after its first call (the sketch is then stored).
    warmup = max(args.warmup, 3) if compiled else args.warmup
    times = interleaved(steps, repeats=args.repeats, warmup=warmup, device=device)
    rows = []
    for name in pair:
        ms = median_ms(times[name]["wall"])
        row = {
            "model": name,
            "baseline": pair[1],
            "size": size,
            "tokens": (size // 16) ** 2,
            "mode": mode,
            "compiled": compiled,
            "compile_mode": (args.compile_mode + (" regional" if args.regional else "")) if compiled else None,
            "batch": batch,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "step_ms": ms,
            "images_per_s": batch / (ms / 1e3),
            "images_per_cpu_s": batch / (median_ms(times[name]["cpu"]) / 1e3),
            "gflop_per_image": flops[name],
        }
        if name in disagreement:
            row["grad_disagreement"] = disagreement[name]
        if device.type == "cuda":
            row["peak_mib"] = peak_memory_bytes(steps[name], device) / MIB
        rows.append(row)
    ours, base = rows
    ours["throughput_vs_baseline"] = ours["images_per_s"] / base["images_per_s"]
    ours["cpu_throughput_vs_baseline"] = ours["images_per_cpu_s"] / base["images_per_cpu_s"]
    base["throughput_vs_baseline"] = base["cpu_throughput_vs_baseline"] = 1.0
    print(
        f"{mode} {'compiled' if compiled else 'eager'} {size}px batch {batch}: {pair[0]} "
        f"{ours['images_per_s']:.1f} img/s, {pair[1]} {base['images_per_s']:.1f} img/s -> "
        f"{ours['throughput_vs_baseline']:.2f}x"
        + "".join(
            f"; gradients vs eager {r['model']} {r['grad_disagreement']:.1e}" for r in rows if "grad_disagreement" in r
        ),
        flush=True,
    )
    return rows


def summarise(rows: list[dict], device: torch.device) -> dict:
    """The training-throughput target for the small pair at 224 px (GPU: bf16 compiled; CPU: ahead, eager)."""
    checks = {}
    for compiled in (False, True):
        row = next(
            (
                r
                for r in rows
                if r["model"].startswith("pace_vit_small")
                and r["size"] == 224
                and r["mode"] == "train"
                and r["compiled"] == compiled
            ),
            None,
        )
        if row is None:
            continue
        ratio = row["throughput_vs_baseline"]
        gpu = device.type == "cuda"
        checks[f"train_small_224_{'compiled' if compiled else 'eager'}"] = {
            "value": ratio,
            "target": f">= {TRAIN_TARGET_GPU}" if gpu else "> 1.0 (ahead)",
            "holds": ratio >= TRAIN_TARGET_GPU if gpu else ratio > 1.0,
        }
    for r in rows:
        if "grad_disagreement" in r:
            checks[f"gradients_{r['model']}_{r['size']}_compiled_vs_eager"] = {
                "value": r["grad_disagreement"],
                "target": f"<= {GRAD_TOLERANCE} (max over parameters of ‖Δg‖/‖g‖, bf16 autocast)",
                "holds": r["grad_disagreement"] <= GRAD_TOLERANCE,
            }
    return checks


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    command = command_line(argv)
    info = machine_info(device)
    rows: list[dict] = []

    def save() -> str:
        # Written after every case: a run stopped by a time limit keeps what it measured.
        checks = summarise(rows, device)
        columns = ["model", "size", "mode", "compiled", "batch", "step_ms", "images_per_s", "throughput_vs_baseline"]
        columns += ["peak_mib"] if device.type == "cuda" else ["images_per_cpu_s", "cpu_throughput_vs_baseline"]
        columns += ["gflop_per_image"] + (["grad_disagreement"] if any("grad_disagreement" in r for r in rows) else [])
        report = "\n\n".join(
            [
                "# Model throughput",
                f"Command: `{command}`",
                "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
                markdown_table(rows, columns),
                format_checks(checks),
            ]
        )
        write_results(args.out, rows, {"command": command, "machine": info, "targets": checks}, report + "\n")
        return report

    for pair in args.pairs:
        for size in args.sizes:
            for mode in args.modes:
                for kind in args.compile:
                    compiled = kind == "compiled"
                    subset = size in args.compile_sizes and mode in args.compile_modes and pair[0] in args.compile_pairs
                    if compiled and not subset:
                        continue
                    rows += run_case(args, device, pair, size, mode, compiled)
                    save()
    print(save())


if __name__ == "__main__":
    main()
