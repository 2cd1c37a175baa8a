"""``pace::matmul_sum``: a sum of scaled matrix products accumulated in fp32, one Triton GEMM where it runs.

The fused mixer's GEMM 2 (``αx̂ − αPQ_eᵀ − βzUᵀ``) and its x̄ (``αg − α gQ_eQ_eᵀ + āUᵀ + ΩS̄ᵀ``) take bf16 operands whose
products are exact in fp32 and must not be rounded to bf16 (the small difference ``αx − αx̂Π_e − …`` would lose it).
In plain PyTorch that is a conversion of every operand to fp32, a scaling of x and U and one product per pair
(8 kernels over (B, N, ·) tensors); on the CPU ``torch.bmm(..., out_dtype=torch.float32)`` does not exist. The Triton
kernel reads each operand once in its own dtype (shared operands in place), multiplies 16-bit tiles on tensor
cores with fp32 accumulation (fp32 tiles as 3xTF32), applies the coefficients read from a device tensor and writes
the result once. Backend per call as in ``pace.kernels._dispatch``.
"""

import torch
from torch import Tensor

from pace.kernels import _dispatch

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_PAIRS = 4


def _coefficient(scalars: Tensor | None, code: int, dtype: torch.dtype) -> Tensor | None:
    # None for code 0 (a factor of 1), ±scalars[|code| − 1] otherwise.
    if code == 0:
        return None
    s = scalars[abs(code) - 1].to(dtype)
    return s if code > 0 else -s


def matmul_sum_reference(
    C: Tensor | None, lhs: list[Tensor], rhs: list[Tensor], scalars: Tensor | None, codes: list[int], batch: int,
    dtype: torch.dtype, out_dtype: torch.dtype | None = None, D: Tensor | None = None,
    batch_scale: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """PyTorch ``s₀C + Σᵢ sᵢ AᵢBᵢ``: operands converted to ``dtype``, each coefficient on the smallest operand.

    Arguments as :func:`matmul_sum`.

    Returns:
        The sum, shape (batch, M, Nn), in ``out_dtype`` (default ``dtype``).
    """
    out = _sum_of_products(C, lhs, rhs, scalars, codes, batch, dtype)
    if batch_scale is not None:
        out = out * batch_scale.to(dtype).view(-1, 1, 1)
    if D is not None:
        out = out + D.to(dtype)
    return out if out_dtype is None else out.to(out_dtype)


def _sum_of_products(C, lhs, rhs, scalars, codes, batch, dtype):
    Nn = rhs[0].shape[-1]
    out, addend = None, None  # out: a fresh tensor written in place; addend: C in dtype, only read (it may be C)
    if C is not None:
        s = _coefficient(scalars, codes[0], dtype)
        addend = C.to(dtype) if s is None else None
        out = None if s is None else (C.to(dtype) * s).expand(batch, -1, -1).contiguous()
    for A, W, code in zip(lhs, rhs, codes[1:]):
        A, W = A.to(dtype), W.to(dtype)
        s = _coefficient(scalars, code, dtype)
        if s is not None:  # scale the smaller factor, not the tall one
            A, W = (A * s, W) if A.numel() < W.numel() else (A, W * s)
        if W.dim() == 2 and A.dim() == 3 and A.is_contiguous() and (out is None or out.is_contiguous()):
            # A shared right factor: one (batch·M, K) × (K, Nn) product.
            A2 = A.reshape(-1, A.shape[-1])
            if out is not None:
                out.view(-1, Nn).addmm_(A2, W)
                continue
            flat = A2 @ W if addend is None else torch.addmm(addend.expand(batch, -1, -1).reshape(-1, Nn), A2, W)
            out = flat.view(batch, -1, Nn)
            continue
        A, W = A.expand(batch, -1, -1), W.expand(batch, -1, -1)
        if out is not None:
            out.baddbmm_(A, W)
        else:
            out = torch.bmm(A, W) if addend is None else torch.baddbmm(addend.expand(batch, -1, -1), A, W)
    return out


# flexible_layout: the kernel reads its matrices through their strides, so Inductor hands them over as they are laid
# out; without it, it copied an input that two of these ops read, once for each (15.7 MB at S sizes, when the full
# form still had a head-major copy of V̄ read by two of them).
@torch.library.custom_op("pace::matmul_sum", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _matmul_sum_op(
    C: Tensor | None, lhs: list[Tensor], rhs: list[Tensor], scalars: Tensor | None, codes: list[int], batch: int,
    dtype: torch.dtype, out_dtype: torch.dtype | None, D: Tensor | None, batch_scale: Tensor | None,
) -> Tensor:  # fmt: skip
    operands = [*lhs, *rhs] + [t for t in (C, D, batch_scale) if t is not None]
    supported = dtype == torch.float32 and all(t.dtype in _TRITON_DTYPES for t in operands)
    supported = supported and out_dtype in (None, torch.bfloat16)
    module = _dispatch.triton_module(lhs[0], "_triton_gemm") if supported else None
    if module is None:
        return matmul_sum_reference(C, lhs, rhs, scalars, codes, batch, dtype, out_dtype, D, batch_scale)
    vectors = [None if t is None else t.contiguous() for t in (scalars, batch_scale)]  # read by index, not strides
    return module.matmul_sum(C, lhs, rhs, vectors[0], codes, batch, out_dtype=out_dtype, D=D, batch_scale=vectors[1])


@_matmul_sum_op.register_fake
def _(C, lhs, rhs, scalars, codes, batch, dtype, out_dtype, D, batch_scale):
    shape = (batch, lhs[0].shape[-2], rhs[0].shape[-1])
    return lhs[0].new_empty(shape, dtype=dtype if out_dtype is None else out_dtype)


def matmul_sum(
    C: Tensor | None,
    lhs: list[Tensor],
    rhs: list[Tensor],
    *,
    scalars: Tensor | None = None,
    codes: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    D: Tensor | None = None,
    batch_scale: Tensor | None = None,
) -> Tensor:
    """``D + t_b(s₀C + Σᵢ sᵢ Aᵢ Bᵢ)`` per batch entry b, products and sum in ``dtype`` (custom op
    ``pace::matmul_sum``); D and the scales t optional (a residual and a branch's stochastic-depth scales).

    The Triton kernel (float32 result; bf16/fp16/fp32 operands) reads every operand once in its own dtype and
    accumulates in fp32; 16-bit products are exact there. Elsewhere :func:`matmul_sum_reference` converts the
    operands to ``dtype`` first (same values up to the order of the sums). No autograd formula: the fused mixer calls
    it inside its own backward.

    Args:
        C: Optional addend, (batch, M, Nn) or (M, Nn), any strides.
        lhs: Left factors ``Aᵢ``, each (batch, M, Kᵢ) or (M, Kᵢ) (shared by every batch entry), any strides.
        rhs: Right factors ``Bᵢ``, each (batch, Kᵢ, Nn) or (Kᵢ, Nn), any strides.
        scalars: 0-dim coefficients live on the device, a 1-D tensor (needed if a code is not 0).
        codes: One per term, C's first: 0 for a coefficient of 1, ``±(j + 1)`` for ``±scalars[j]``; default all 0.
        dtype: The result's dtype (float32 or float64).
        out_dtype: The dtype the result is written in, if not ``dtype``: a narrower one it is rounded to (nearest
            even) as it is stored, with no second pass. The kernel writes bfloat16; any other dtype runs the
            fallback.
        D: Optional addend that no coefficient scales, (batch, M, Nn) or (M, Nn), any strides.
        batch_scale: Optional scales ``t``, shape (batch,): batch entry b's sum (all but D) is multiplied by t_b.

    Returns:
        The sum, shape (batch, M, Nn), contiguous, in ``out_dtype`` (default ``dtype``).
    """
    codes = [0] * (len(lhs) + 1) if codes is None else list(codes)
    batches = {t.shape[0] for t in (C, D, *lhs, *rhs) if t is not None and t.dim() == 3}
    M, Nn = lhs[0].shape[-2] if lhs else 0, rhs[0].shape[-1] if rhs else 0
    ok = 0 < len(lhs) == len(rhs) <= MAX_PAIRS and len(codes) == len(lhs) + 1 and len(batches) <= 1
    ok = ok and all(a.dim() in (2, 3) and w.dim() in (2, 3) for a, w in zip(lhs, rhs))
    ok = ok and all(a.shape[-2] == M and w.shape[-1] == Nn and a.shape[-1] == w.shape[-2] for a, w in zip(lhs, rhs))
    ok = ok and all(t is None or (t.dim() in (2, 3) and t.shape[-2:] == (M, Nn)) for t in (C, D))
    if not ok:
        shapes = [None if t is None else tuple(t.shape) for t in (C, D)]
        shapes += [[tuple(a.shape) for a in lhs], [tuple(w.shape) for w in rhs]]
        raise ValueError(
            f"matmul_sum: C and D (b, M, N), Aᵢ (b, M, Kᵢ), Bᵢ (b, Kᵢ, N), ≤ {MAX_PAIRS} pairs expected, got {shapes}"
        )
    if any(codes) and scalars is None:
        raise ValueError(f"matmul_sum: codes {codes} need scalars")
    out_dtype = None if out_dtype == dtype else out_dtype
    batch = batches.pop() if batches else 1
    if batch_scale is not None and tuple(batch_scale.shape) != (batch,):
        raise ValueError(f"matmul_sum: batch_scale of shape ({batch},) expected, got {tuple(batch_scale.shape)}")
    return _matmul_sum_op(C, list(lhs), list(rhs), scalars, codes, batch, dtype, out_dtype, D, batch_scale)
