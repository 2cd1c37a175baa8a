"""Count the kernels and bytes a regionally compiled block would launch: Inductor's schedule, read on the CPU.

``scripts/_op_counter.py`` counts the eager ATen op sequence. Under ``torch.compile`` Inductor fuses pointwise and
reduction work into generated kernels and calls GEMMs and custom ops (``pace::``) as extern kernels. This module
compiles a module the way :func:`pace.models.compile_blocks` does (``nn.Module.compile``; Inductor's decompositions,
joint-graph passes and min-cut partitioner for forward and backward), and reads Inductor's scheduler right after
fusion: one scheduler node = one kernel launch, and its bytes are Inductor's own estimate
(``BaseSchedulerNode.get_read_write_buffers_sizes``: every buffer read from or written to memory outside the kernel
once, buffers that live only inside a fused kernel not at all; an extern kernel's inputs + outputs). That is the
same figure Inductor logs as ``metrics.num_bytes_accessed``.

Code generation is skipped: the post-fusion hook records the schedule and stops the compile, and the graph runs
eagerly instead (same values), so counting a block costs seconds, not a C++ or Triton build. Because no code is
generated, the schedule can be read for either Inductor backend on CPU tensors: ``"cpp"`` (what a CPU compile
runs) or ``"triton"`` (Inductor's Triton scheduling and fusion rules, what a GPU compile uses; lowering itself
still sees CPU tensors, except that a cat is lowered as on a GPU, one pointwise kernel).

:func:`time_compile` compiles a model's blocks for real and times its first training steps (compile time, frames,
graph breaks).
"""

import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch._dynamo
import torch._functorch.config as functorch_config
from _op_counter import OpCount, OpRecord
from torch import nn
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor import scheduler as sched
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

from pace.models import compile_blocks

BACKENDS = ("cpp", "triton")
_GEMMS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "_int_mm", "_scaled_mm"}


class _ScheduledStopError(Exception):
    """Raised by the post-fusion hook once the schedule is recorded: no code is generated."""


def _kernel_record(node: "sched.BaseSchedulerNode", graph: str) -> OpRecord | None:
    """One launched kernel of the schedule (None for nodes that launch nothing)."""
    if isinstance(node, sched.NopKernelSchedulerNode):
        return None
    flops = getattr(node, "estimate_flops", lambda: None)() or 0
    if isinstance(node, sched.ExternKernelSchedulerNode):
        if isinstance(node.node, ir.MultiOutput):
            return None  # picks one output of a multi-output extern call: no kernel
        op = getattr(node.node, "op_overload", None)
        if op is not None:
            name = op.name() if hasattr(op, "name") else str(op)
            namespace = name.split("::")[0]
            short = name.split("::")[-1].split(".")[0]
        else:
            name = getattr(node.node, "python_kernel_name", None) or type(node.node).__name__
            namespace, short = "", name.rsplit(".", 1)[-1].removesuffix("_out")
        if namespace == "pace":
            category = "pace op (extern)"
        elif short in _GEMMS:
            category = "extern GEMM"
        else:
            category = "extern other"
        return OpRecord(f"{graph}: {short}", category, int(node.get_read_write_buffers_sizes()), int(flops))
    origins = sorted({o.target.__name__ for n in node.get_nodes() for o in n.node.origins if callable(o.target)})
    label = "+".join(o.split(".")[0] for o in origins[:3]) + ("+…" if len(origins) > 3 else "")
    return OpRecord(f"{graph}: fused {label}", "generated", int(node.get_read_write_buffers_sizes()), int(flops))


class ScheduleRecorder:
    """An Inductor backend for ``torch.compile`` that records each graph's schedule and runs the graph eagerly.

    Args:
        backend: Inductor's CPU backend whose scheduling (fusion rules) to read: ``"cpp"`` or ``"triton"``.
    """

    def __init__(self, backend: str = "cpp") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.graphs: list[tuple[str, list[OpRecord]]] = []  # ("fwd" or "bwd", kernels)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        return compile_fx(gm, example_inputs, inner_compile=self._inner)

    def _inner(self, gm: torch.fx.GraphModule, example_inputs: list, **kwargs) -> Callable:
        graph = "fwd" if not kwargs.get("is_backward") else "bwd"
        before = len(self.graphs)

        def record(nodes: list) -> list:
            self.graphs.append((graph, [r for r in (_kernel_record(n, graph) for n in nodes) if r is not None]))
            raise _ScheduledStopError

        patch = {"_post_fusion_custom_pass": record, "fx_graph_cache": False, "cpu_backend": self.backend}
        if self.backend == "triton":
            # A cat of a few small inputs ([τ, α, β], the two sketches) is one pointwise kernel on a GPU, fused with
            # its inputs' conversions; on CPU tensors Inductor always lowers cat as one copy kernel per input
            # (lowering.cat: pointwise cat is disabled on the CPU for speed), so the GPU's choice is forced here.
            patch["force_pointwise_cat"] = True
        try:
            with inductor_config.patch(patch):
                compile_fx_inner(gm, example_inputs, **kwargs)
        except Exception:
            if len(self.graphs) == before:  # a real failure, not the hook's stop
                raise
        if len(self.graphs) == before:
            raise RuntimeError("Inductor compiled a graph without scheduling it (a cache hit?): nothing counted")
        return make_boxed_func(gm.forward)

    def count(self) -> OpCount:
        """All recorded kernels, forward and backward graphs together."""
        return OpCount([r for _, g in self.graphs for r in g])


def count_compiled(module: nn.Module, step: Callable[[], object], backend: str = "cpp") -> tuple[OpCount, int]:
    """Compile ``module`` in place as ``compile_blocks`` does, run ``step()`` once, and count the schedule.

    ``step`` must call ``module`` (and usually ``backward``); shapes are static (one compile per call), and the
    module is eager again afterwards.

    Args:
        module: The block to compile (``nn.Module.compile``).
        step: Runs the module forward (and backward) once.
        backend: Inductor backend whose scheduling is read, ``"cpp"`` or ``"triton"``.

    Returns:
        The kernels (``OpCount``, categories ``generated``, ``extern GEMM``, ``pace op (extern)``,
        ``extern other``) and the number of forward graphs Dynamo produced (1 without graph breaks).
    """
    recorder = ScheduleRecorder(backend)
    torch._dynamo.reset()
    module.compile(backend=recorder, dynamic=False)
    try:
        # A cached AOT graph would skip Inductor, and with it the schedule this counter reads.
        with functorch_config.patch(enable_autograd_cache=False):
            step()
    finally:
        module._compiled_call_impl = None  # back to eager (nn.Module.compile's own attribute)
        torch._dynamo.reset()
    forward_graphs = sum(1 for kind, _ in recorder.graphs if kind == "fwd")
    return recorder.count(), forward_graphs


@contextmanager
def _cold_caches():
    # A fresh Inductor cache directory (FX graphs, AOT graphs, built kernels): the compile time of a first run.
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="pace-compile-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


class _CallCountingInductor:
    """Inductor (``torch._inductor.compile_fx``), counting the frames it compiles and the calls of their code."""

    def __init__(self) -> None:
        self.frames = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.frames += 1
        compiled = compile_fx(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run


def time_compile(model: nn.Module, step: Callable[[], object], steps: int = 4, eager_first: bool = False) -> dict:
    """Compile ``model``'s blocks for real (``compile_blocks``, Inductor) and time its first steps.

    The compile time is the wall time of every step but the last, less the last (warm) step's time each. Caches
    are cold (a fresh Inductor cache directory).

    Args:
        model: The model, in training mode.
        step: One training step (forward + backward) of ``model``.
        steps: Steps to run; the last one must be warm.
        eager_first: Run one eager step before compiling (PACE draws and stores its sketches then, as
            ``set_epoch`` does from the second epoch on; otherwise each block's first forward draws its sketch
            inside its graph, specialised on the block).

    Returns:
        ``{"step_s": [...], "compile_s", "frames", "compiled_calls", "graph_breaks", "break_reasons"}``: frames
        compiled, calls of compiled code per step (one per compiled block when every block runs compiled), and
        Dynamo's graph-break counters.
    """
    torch._dynamo.reset()
    counters.clear()
    if eager_first:
        step()
    backend = _CallCountingInductor()
    compile_blocks(model, backend=backend)
    times, calls = [], []
    with _cold_caches():
        for _ in range(steps):
            backend.calls = 0
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            calls.append(backend.calls)
    torch._dynamo.reset()
    breaks = dict(counters["graph_break"])
    return {
        "step_s": times,
        "compile_s": sum(t - times[-1] for t in times[:-1]),
        "frames": backend.frames,
        "compiled_calls": calls,
        "graph_breaks": sum(breaks.values()),
        "break_reasons": breaks,
    }
