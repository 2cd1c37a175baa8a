"""Count the ATen ops, bytes and matrix FLOPs a piece of code runs: the CPU-side proxy of its GPU cost.

A ``TorchDispatchMode`` sees every ATen op after autocast and autograd have chosen dtypes and decomposed the
work, i.e. the ops a GPU would launch as kernels in eager mode. For each op that is not a view (views move no
data) it records the bytes of its tensor inputs and outputs (a memory-bound kernel reads and writes at least
that much) and, for matrix products and the small linear algebra, its FLOPs. Bytes of a broadcast (stride 0)
dimension are counted once: the kernel reads that memory once, not once per broadcast row.
"""

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
KERNEL_MODES = ("fused", "fallback")
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

# Ops that only relabel or allocate memory (no kernel reads or writes data), besides the views.
_METADATA_OPS = {
    aten._unsafe_view.default,
    aten.lift_fresh.default,
    aten.detach.default,
    aten.empty.memory_format,
    aten.new_empty.default,
    aten.empty_like.default,
    aten.empty_strided.default,
}


def _storage_bytes(t: torch.Tensor) -> int:
    # Elements a kernel touches: a stride-0 (broadcast) dimension does not multiply the memory read.
    touched = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0) if t.dim() else 1
    return touched * t.element_size()


def _mm_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    # (…, m, k) @ (…, k, n): one multiply-add (2 FLOPs) per output element and k.
    batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


def _flops(name: str, args: tuple, out: object) -> int:
    """Matrix-product and small-linear-algebra FLOPs of one op (0 for the rest)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("mm", "bmm", "matmul"):
        return _mm_flops(tensors[0], tensors[1])
    if name in ("addmm", "baddbmm", "addbmm", "addmm_", "baddbmm_"):
        return _mm_flops(tensors[1], tensors[2])
    if name == "matmul_sum":  # pace::matmul_sum(C, lhs, rhs, scalars, codes, batch, dtype): Σᵢ AᵢBᵢ per batch entry
        lhs, rhs, batch = args[1], args[2], args[5]
        return sum(2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1] for a, b in zip(lhs, rhs))
    if name == "linalg_cholesky_ex":
        a = tensors[0]
        return math.prod(a.shape[:-2]) * a.shape[-1] ** 3 // 3
    if name == "linalg_solve_triangular":
        a, b = tensors[0], tensors[1]
        return math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])) * b.shape[-2] * b.shape[-1] * a.shape[-1]
    if name in ("linalg_inv_ex", "linalg_householder_product", "linalg_qr", "geqrf"):
        a = tensors[0]
        return 2 * math.prod(a.shape[:-2]) * a.shape[-1] ** 3
    return 0


def _category(name: str, dtypes: set[torch.dtype], flops: int) -> str:
    if name in ("_to_copy", "copy_") and len(dtypes) > 1:
        return "dtype copy"
    if name.startswith("linalg_") or name in ("geqrf", "cholesky_solve", "triangular_solve"):
        return "small linalg"
    if flops:
        return "matmul " + "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    return "elementwise/reduction"


@dataclass
class OpRecord:
    """One ATen op: its name, category, bytes of its inputs and outputs, and FLOPs."""

    name: str
    category: str
    bytes: int
    flops: int


@dataclass
class OpCount:
    """The ops one run executed (views excluded)."""

    records: list[OpRecord] = field(default_factory=list)

    @property
    def ops(self) -> int:
        return len(self.records)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.records)

    def by(self, key: str) -> dict[str, tuple[int, int, int]]:
        """``{name or category: (ops, bytes, flops)}``, largest bytes first.

        Args:
            key: ``"name"`` or ``"category"``.

        Returns:
            The totals per group.
        """
        groups: dict[str, list[int]] = {}
        for r in self.records:
            g = groups.setdefault(getattr(r, key), [0, 0, 0])
            g[0] += 1
            g[1] += r.bytes
            g[2] += r.flops
        return dict(sorted(((k, tuple(v)) for k, v in groups.items()), key=lambda kv: -kv[1][1]))

    def names(self) -> Counter:
        """How often each op ran."""
        return Counter(r.name for r in self.records)


class OpCounterMode(TorchDispatchMode):
    """Record every non-view ATen op run under this mode into ``self.count``.

    A ``pace::`` custom op (pace.kernels) counts as one op that reads its inputs and writes its outputs once, what
    its fused Triton kernel moves on a GPU (``kernels="fused"``, the default), or as the ATen ops of the PyTorch
    fallback it runs on the CPU (``kernels="fallback"``).

    Args:
        kernels: ``"fused"`` or ``"fallback"``.
    """

    def __init__(self, kernels: str = "fused") -> None:
        super().__init__()
        if kernels not in KERNEL_MODES:
            raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}")
        self.expand_custom = kernels == "fallback"
        self.count = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.expand_custom and func.namespace == "pace":
            # The mode is off inside its own handler: back on, and straight to the implementation (the CPU key)
            # so that its ATen ops, not the custom op again, come through this mode.
            with self:
                return func.redispatch(_CPU_KEYS, *args, **kwargs)
        out = func(*args, **kwargs)
        if func.is_view or func in _METADATA_OPS:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not inputs and not outputs:
            return out  # a dtype query such as promote_types: no kernel
        name = func.overloadpacket.__name__
        flops = _flops(name, tuple(args), out)
        dtypes = {t.dtype for t in inputs + outputs if t.is_floating_point()}
        nbytes = sum(_storage_bytes(t) for t in inputs + outputs)
        category = "pace kernel" if func.namespace == "pace" else _category(name, dtypes, flops)
        self.count.records.append(OpRecord(name, category, nbytes, flops))
        return out


def count_ops(fn: Callable[[], object], kernels: str = "fused") -> OpCount:
    """Run ``fn()`` under an :class:`OpCounterMode` and return what it executed.

    Args:
        fn: The code to count (forward and backward if it calls ``backward``).
        kernels: How ``pace::`` custom ops count: ``"fused"`` (one op, inputs + outputs: the Triton kernel) or
            ``"fallback"`` (the ATen ops of their PyTorch implementation).

    Returns:
        The recorded ops.
    """
    with OpCounterMode(kernels) as mode:
        fn()
    return mode.count


def extrapolate(small: OpCount, large: OpCount, b_small: int, b_large: int, b_target: int) -> dict[str, float]:
    """Bytes and FLOPs at batch ``b_target`` from two runs, assuming both are affine in the batch.

    Args:
        small: Count at batch ``b_small``.
        large: Count at batch ``b_large``.
        b_small: The smaller batch.
        b_large: The larger batch.
        b_target: The batch to extrapolate to.

    Returns:
        ``{"ops", "bytes", "flops"}`` at ``b_target`` (ops must not depend on the batch).
    """
    if small.ops != large.ops:
        raise ValueError(f"op count depends on the batch: {small.ops} at {b_small}, {large.ops} at {b_large}")
    t = (b_target - b_small) / (b_large - b_small)
    return {
        "ops": small.ops,
        "bytes": small.bytes + t * (large.bytes - small.bytes),
        "flops": small.flops + t * (large.flops - small.flops),
    }
