"""Timing, peak-memory and report helpers shared by the benchmark scripts (not part of the package).

Every comparison is measured in one process: the candidates run interleaved, repeat after repeat, in an order
that rotates each repeat, and the median is reported. On a GPU a step is timed with CUDA events around it and a
synchronisation after it; on a CPU with the wall clock, and the process CPU time beside it (which a busy shared
machine disturbs less at one thread).
"""

import contextlib
import csv
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter as torch_flops

MIB = 2**20


def pick_device(name: str) -> torch.device:
    """The device to benchmark on; a clear error when CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU (the training precision there); full float32 on a CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; on a GPU the wall time comes from CUDA events."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        cpu0 = time.process_time()
        start.record()
        fn()
        end.record()
        synchronize(device)
        return start.elapsed_time(end) / 1e3, time.process_time() - cpu0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0


def interleaved(
    cases: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """Time every case ``repeats`` times, interleaved (case order rotates each repeat), after ``warmup`` calls.

    Returns:
        name → {"wall": [...], "cpu": [...]} in seconds.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    synchronize(device)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time_once(cases[name], device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def median_ms(samples: Iterable[float]) -> float:
    return statistics.median(samples) * 1e3


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of the memory allocated by ``fn`` above what was allocated before it.

    GPU: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the allocator's allocation and free events
    recorded by ``torch.profiler`` (``profile_memory=True``), replayed in time order; tensors that existed before
    the call (parameters, inputs) are not counted.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def saved_tensor_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for the backward during ``forward()`` (activation memory)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def _baddbmm_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * math.prod(a_shape) * b_shape[-1]


def _solve_triangular_flop(a_shape, b_shape, *args, **kwargs) -> int:
    # Every right-hand row or column of B costs c²/2 multiply-adds against the c × c triangle.
    return math.prod(b_shape) * a_shape[-1]


def _cholesky_flop(a_shape, *args, **kwargs) -> int:
    return math.prod(a_shape[:-2]) * a_shape[-1] ** 3 // 3


def flop_counter() -> torch_flops.FlopCounterMode:
    """``FlopCounterMode`` for matrix products (also the in-place ``baddbmm_``), triangular solves and Cholesky.

    Elementwise work is not counted; both sides of every comparison are counted the same way.
    """
    extra = {
        torch.ops.aten.baddbmm_: _baddbmm_flop,
        torch.ops.aten.linalg_solve_triangular: _solve_triangular_flop,
        torch.ops.aten.linalg_cholesky_ex: _cholesky_flop,
    }
    return torch_flops.FlopCounterMode(display=False, custom_mapping=extra)


def _cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_sha() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def machine_info(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on: processor, cores, threads, GPU, library versions, date, commit."""
    import timm

    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "commit": _git_sha(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["load_average"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return info


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (floats with 3 significant decimals)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def command_line(argv: list[str] | None) -> str:
    """The command that ran this script, for the report."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])


def format_checks(checks: dict[str, dict]) -> str:
    """One markdown bullet per target check: measured value, target, whether it holds, and any side numbers."""
    lines = []
    for name, check in checks.items():
        side = [f"{k} {v:.2f}" for k, v in check.items() if k != "value" and isinstance(v, float)]
        verdict = "holds" if check["holds"] else "does not hold"
        line = f"- {name}: {check['value']:.2f} (target {check['target']}): {verdict}"
        lines.append(line + ("; " + ", ".join(side) if side else ""))
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict[str, object]], summary: dict[str, object], report: str) -> None:
    """Write ``results.csv`` (one row per measurement), ``summary.json`` and ``report.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.md").write_text(report)
