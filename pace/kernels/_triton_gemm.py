"""Triton kernel of ``pace.kernels.matmul_sum``: ``out = s₀C + Σᵢ sᵢ AᵢBᵢ`` per batch entry, fp32 accumulation.

Imported lazily by ``pace.kernels._dispatch``. One program per (batch entry, BM × BN output tile); the launcher takes
operands of any strides (a batch stride of 0 reads a shared operand in place) and the coefficients as codes into a
device tensor of scalars, so no scalar is read on the host. ``out`` exists so that tests can hand in a poisoned
buffer.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from pace.kernels._triton_mixer import _rounded

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_PAIRS = 4
# Products of fp32 operand tiles: three TF32 tensor-core products (hi·hi + hi·lo + lo·hi), fp32-accurate to about
# 1e-6 relative; 16-bit tiles multiply exactly on tensor cores with fp32 accumulation.
PRECISION = tl.constexpr("tf32x3")


@triton.jit
def _coefficient(S_ptr, CODE: tl.constexpr):
    """1 for code 0, ±scalars[|code| − 1] otherwise."""
    if CODE > 0:
        s = tl.load(S_ptr + (CODE - 1)).to(tl.float32)
    elif CODE < 0:
        s = -tl.load(S_ptr + (-CODE - 1)).to(tl.float32)
    else:
        s = 1.0
    return s


@triton.jit
def _pair_product(
    A_ptr, B_ptr, b, m, n, M, Nn, Kd, sab, sam, sak, sbb, sbk, sbn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The (BM, BN) tile of ``A[b] @ B[b]`` in fp32 (rows m, columns n)."""
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Kd, BK):
        k = k0 + kk
        a = tl.load(
            A_ptr + b * sab + m[:, None] * sam + k[None, :] * sak, mask=(m[:, None] < M) & (k[None, :] < Kd), other=0.0
        )
        w = tl.load(
            B_ptr + b * sbb + k[:, None] * sbk + n[None, :] * sbn, mask=(k[:, None] < Kd) & (n[None, :] < Nn), other=0.0
        )
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(a, w)
    return acc


@triton.jit
def _matmul_sum_kernel(
    C_ptr, S_ptr, O_ptr, D_ptr, BS_ptr,
    A0_ptr, B0_ptr, A1_ptr, B1_ptr, A2_ptr, B2_ptr, A3_ptr, B3_ptr,
    M, Nn, K0, K1, K2, K3,
    scb, scm, scn, sdb, sdm, sdn,
    s0ab, s0am, s0ak, s0bb, s0bk, s0bn,
    s1ab, s1am, s1ak, s1bb, s1bk, s1bn,
    s2ab, s2am, s2ak, s2bb, s2bk, s2bn,
    s3ab, s3am, s3ak, s3bb, s3bk, s3bn,
    HAS_C: tl.constexpr, HAS_D: tl.constexpr, HAS_BS: tl.constexpr, PAIRS: tl.constexpr,
    ROUND_BF16: tl.constexpr, INTERPRETED: tl.constexpr,
    CODE_C: tl.constexpr, CODE0: tl.constexpr, CODE1: tl.constexpr, CODE2: tl.constexpr, CODE3: tl.constexpr,
    UP0: tl.constexpr, UP1: tl.constexpr, UP2: tl.constexpr, UP3: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Tile (m, n) of ``D[b] + t_b(s₀C[b] + Σᵢ sᵢ Aᵢ[b] Bᵢ[b])`` (D and the batch scales t optional), each pair's
    product accumulated in fp32, written once."""
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    acc = _coefficient(S_ptr, CODE0) * _pair_product(
        A0_ptr, B0_ptr, b, m, n, M, Nn, K0, s0ab, s0am, s0ak, s0bb, s0bk, s0bn, BM, BN, BK, UP0
    )
    if PAIRS > 1:
        acc += _coefficient(S_ptr, CODE1) * _pair_product(
            A1_ptr, B1_ptr, b, m, n, M, Nn, K1, s1ab, s1am, s1ak, s1bb, s1bk, s1bn, BM, BN, BK, UP1
        )
    if PAIRS > 2:
        acc += _coefficient(S_ptr, CODE2) * _pair_product(
            A2_ptr, B2_ptr, b, m, n, M, Nn, K2, s2ab, s2am, s2ak, s2bb, s2bk, s2bn, BM, BN, BK, UP2
        )
    if PAIRS > 3:
        acc += _coefficient(S_ptr, CODE3) * _pair_product(
            A3_ptr, B3_ptr, b, m, n, M, Nn, K3, s3ab, s3am, s3ak, s3bb, s3bk, s3bn, BM, BN, BK, UP3
        )
    mask = (m[:, None] < M) & (n[None, :] < Nn)
    if HAS_C:
        c = tl.load(C_ptr + b * scb + m[:, None] * scm + n[None, :] * scn, mask=mask, other=0.0).to(tl.float32)
        acc += _coefficient(S_ptr, CODE_C) * c
    if HAS_BS:
        acc *= tl.load(BS_ptr + b).to(tl.float32)
    if HAS_D:
        acc += tl.load(D_ptr + b * sdb + m[:, None] * sdm + n[None, :] * sdn, mask=mask, other=0.0).to(tl.float32)
    if ROUND_BF16:  # to nearest even on a GPU; the interpreter truncates, so its bits are pre-rounded
        acc = _rounded(acc, INTERPRETED).to(tl.bfloat16).to(tl.float32)
    tl.store(O_ptr + (b * M + m[:, None]) * Nn + n[None, :], acc.to(O_ptr.dtype.element_ty), mask=mask)


PROBE_KERNEL = _matmul_sum_kernel  # how pace.kernels._dispatch tells compiled from interpreted


def _batch_strides(t: Tensor) -> tuple[int, int, int]:
    # (batch, row, column) strides; a 2-D operand is shared by every batch entry (batch stride 0).
    return (0, *t.stride()) if t.dim() == 2 else tuple(t.stride())


def matmul_sum(
    C: Tensor | None,
    lhs: list[Tensor],
    rhs: list[Tensor],
    scalars: Tensor | None,
    codes: list[int],
    batch: int,
    out: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    D: Tensor | None = None,
    batch_scale: Tensor | None = None,
) -> Tensor:
    """``s₀C + Σᵢ sᵢ AᵢBᵢ`` accumulated in fp32 by the Triton kernel, written in fp32 or in ``out_dtype`` (bf16,
    rounded to nearest even); see ``pace.kernels.matmul_sum`` (which checks shapes)."""
    M, Nn = lhs[0].shape[-2], rhs[0].shape[-1]
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    out = torch.empty((batch, M, Nn), device=lhs[0].device, dtype=out_dtype) if out is None else out
    if out.numel() == 0:
        return out
    pairs = len(lhs)
    A = [*lhs, *[lhs[0]] * (MAX_PAIRS - pairs)]
    B = [*rhs, *[rhs[0]] * (MAX_PAIRS - pairs)]
    ks = [a.shape[-1] for a in A]
    strides = [s for a, w in zip(A, B) for s in (*_batch_strides(a), *_batch_strides(w))]
    # Two 16-bit tiles of one dtype multiply exactly on tensor cores; anything else goes through fp32 tiles (and the
    # interpreter multiplies 16-bit tiles as raw bits, so there everything does).
    up = [_INTERPRETED or a.dtype != w.dtype or a.dtype == torch.float32 for a, w in zip(A, B)]
    c_strides = _batch_strides(C) if C is not None else (0, 0, 0)
    d_strides = _batch_strides(D) if D is not None else (0, 0, 0)
    S = scalars if scalars is not None else out
    BM, BN, BK = 64, 64, 32
    _matmul_sum_kernel[(batch, triton.cdiv(M, BM), triton.cdiv(Nn, BN))](
        C if C is not None else out, S, out, D if D is not None else out, batch_scale if batch_scale is not None else S,
        A[0], B[0], A[1], B[1], A[2], B[2], A[3], B[3],
        M, Nn, *ks, *c_strides, *d_strides, *strides,
        HAS_C=C is not None, HAS_D=D is not None, HAS_BS=batch_scale is not None, PAIRS=pairs,
        ROUND_BF16=out.dtype == torch.bfloat16, INTERPRETED=_INTERPRETED, CODE_C=codes[0], CODE0=codes[1],
        CODE1=codes[2] if pairs > 1 else 0, CODE2=codes[3] if pairs > 2 else 0, CODE3=codes[4] if pairs > 3 else 0,
        UP0=up[0], UP1=up[1], UP2=up[2], UP3=up[3], BM=BM, BN=BN, BK=BK, num_warps=4,
    )  # fmt: skip
    return out
