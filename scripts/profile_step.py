"""Profile training steps of a timm model: where a step's time goes, operator by operator.

Runs warm-up steps, then profiles ``--steps`` training steps (forward, cross-entropy, backward, AdamW; bf16
autocast on a GPU) with ``torch.profiler`` and writes, under ``--out``:

* ``profile.txt``: the operators sorted by their own device time (GPU) or CPU time (CPU);
* ``summary.json``: wall time per step and, on a GPU, the kernels' busy time per step and the busy share
  (busy / wall). A share well below 1 means the GPU waits on the host (kernel launches, Python), which CUDA
  graphs or fusion fix; a share near 1 means the kernels themselves are the cost.

    python scripts/profile_step.py --model pace_vit_small_patch16_224 --device cuda --batch 128 --out outputs/prof
    python scripts/profile_step.py --model pace_vit_test --img-size 32 --batch 4 --steps 2 --out outputs/prof_cpu
"""

import argparse
import json
from pathlib import Path

import torch
from _bench_utils import command_line, machine_info, median_ms, pick_device, synchronize, time_once
from bench_model import build, compile_model, train_step
from torch.profiler import ProfilerActivity, profile

import pace  # noqa: F401  (registers the pace_vit_* models with timm)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pace_vit_small_patch16_224", help="timm model name")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (bf16 autocast on cuda)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--compile", default=None, help="a torch.compile mode (default, reduce-overhead, ...)")
    parser.add_argument("--regional", action="store_true", help="with --compile: compile each block in place")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--row-limit", type=int, default=30, help="operators in the table")
    parser.add_argument("--out", type=Path, default=Path("outputs/profile_step"), help="output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        raise SystemExit(f"--steps and --batch must be positive, got {args.steps} and {args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    model = build(args.model, args.img_size, args.num_classes, device)
    if args.compile:
        model = compile_model(model, argparse.Namespace(compile_mode=args.compile, regional=args.regional))
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(args.num_classes, (args.batch,), device=device)
    step = train_step(model, images, labels, device)
    for _ in range(args.warmup):
        step()
    wall_ms = median_ms(time_once(step, device)[0] for _ in range(args.steps))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize(device)
    events = prof.key_averages()
    sort_by = "self_device_time_total" if gpu else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=args.row_limit)
    summary = {
        "command": command_line(argv),
        "machine": machine_info(device),
        "model": args.model,
        "batch": args.batch,
        "img_size": args.img_size,
        "compile": args.compile,
        "regional": args.regional,
        "wall_ms_per_step": wall_ms,
    }
    if gpu:
        # Kernel time only: the profiler's device time of every event that ran on the device, once per kernel.
        busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        summary["gpu_busy_ms_per_step"] = busy_us / 1e3 / args.steps
        summary["gpu_busy_share"] = summary["gpu_busy_ms_per_step"] / wall_ms
        summary["kernels_per_step"] = (
            sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / args.steps
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.txt").write_text(table + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
