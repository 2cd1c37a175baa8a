"""Which implementation runs a kernel op: Triton (compiled on CUDA, interpreted on the CPU) or plain PyTorch.

The choice is made per call from the tensor's device and one setting, ``PACE_TRITON``:

- ``auto`` (default): Triton for CUDA tensors when Triton imports, PyTorch otherwise (CPU tensors, no Triton).
- ``off``: PyTorch always.
- ``interpret``: Triton everywhere; CPU tensors run through the Triton interpreter (slow; for tests).
  ``TRITON_INTERPRET=1`` in the environment means the same.

The setting is read from the environment at each call, or overridden in-process with :func:`use_backend`.
The Triton kernels live in ``_triton_ridge.py`` (ridge step, Compress memberships), ``_triton_ridge_bwd.py`` (its
backward's c × c work), ``_triton_mixer.py`` and ``_triton_diag.py`` (the fused mixer's elementwise work, both
forms), ``_triton_gemm.py`` (its sums of products) and ``_triton_norm.py`` (the block's LayerNorm around it), loaded
lazily on first use. Triton decides between compiling
and interpreting when a function is decorated, for its own standard library (``tl.sum``, ``tl.zeros``) when
``triton`` is first imported, which torch and pace do early. So the interpreter works only in a process that had
``TRITON_INTERPRET=1`` in its environment before ``triton`` was imported (start Python with it, as the tests do
in a subprocess); asking for it in any other process raises a RuntimeError saying so. In such a process CUDA
tensors are interpreted as well.
"""

import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "off", "interpret")
_override: str | None = None
_modules: dict[str, ModuleType | None] = {}
_lock = threading.Lock()


def current_backend() -> str:
    """The setting in force: the :func:`use_backend` override, else ``PACE_TRITON`` (``TRITON_INTERPRET=1``
    meaning ``interpret``), else ``auto``."""
    if _override is not None:
        return _override
    value = os.environ.get("PACE_TRITON", "").strip().lower()
    if value:
        if value not in BACKENDS:
            raise ValueError(f"PACE_TRITON must be one of {BACKENDS}, got {value!r}")
        return value
    return "interpret" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "auto"


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (process-wide, not thread-local).

    Args:
        backend: One of ``auto``, ``off``, ``interpret``.
    """
    global _override
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    previous, _override = _override, backend
    try:
        yield
    finally:
        _override = previous


def _load(name: str) -> ModuleType | None:
    """Kernel module ``pace.kernels.<name>`` (compiled, or interpreted under ``TRITON_INTERPRET=1``); None when
    Triton is missing."""
    with _lock:
        if name not in _modules:
            try:
                _modules[name] = importlib.import_module(f"pace.kernels.{name}")
            except ImportError:
                _modules[name] = None
        return _modules[name]


def _interpreted(module: ModuleType) -> bool:
    # Kernels decorated while TRITON_INTERPRET=1 are InterpretedFunction objects, not JITFunction.
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(module.PROBE_KERNEL, JITFunction) and not isinstance(tl.zeros, JITFunction)


def triton_module(t: torch.Tensor, name: str = "_triton_ridge") -> ModuleType | None:
    """The Triton kernel module ``name`` to run an op on ``t`` with, or None to use the PyTorch implementation."""
    backend = current_backend()
    if backend == "off":
        return None
    if t.device.type == "cuda":
        return _load(name)
    if t.device.type != "cpu" or backend != "interpret":
        return None
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # explicitly asked for: interpret every kernel of this process
    module = _load(name)
    if module is None:
        raise RuntimeError(
            "the Triton interpreter was requested (PACE_TRITON/use_backend), but triton is not installed"
        )
    if not _interpreted(module):
        raise RuntimeError(
            "the Triton interpreter was requested, but triton was imported without TRITON_INTERPRET=1: "
            "start Python with TRITON_INTERPRET=1 in the environment"
        )
    return module
