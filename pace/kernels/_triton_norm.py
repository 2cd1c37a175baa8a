"""Triton kernels of the PACE block's LayerNorm around the fused mixer: ``layer_norm_cast`` and its backward.

Imported lazily by ``pace.kernels._dispatch``. One program per block of ``NORM_ROWS`` tokens, each token's C
features in one register row (C padded to a power of two). The launchers assume what the custom ops in
``pace.kernels.norm_ops`` check: contiguous (T, C) tokens, float32 weight and bias (C,), float32 statistics (T,).
``out`` arguments exist so that tests can hand in poisoned buffers and check that every element is written.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from pace.kernels._triton_mixer import _rounded

# The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even: under it, stores pre-round the bits.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
NORM_ROWS = 16
# The backward's weight and bias gradients are summed per program over a fixed number of programs, then over the
# programs: a fixed count keeps the summation order (and the result) the same on every GPU.
NORM_PARTIALS = 512


@triton.jit
def _layer_norm_cast_kernel(
    X_ptr, W_ptr, B_ptr, Y_ptr, Mean_ptr, Rstd_ptr, T, C, eps,
    BT: tl.constexpr, BC: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """BT tokens: ``y = (x − μ)·rstd·w + b`` written in Y's dtype, μ and rstd = 1/√(var + ε) in fp32."""
    t1 = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    c1 = tl.arange(0, BC)
    t, c = t1[:, None], c1[None, :]
    mask = (t < T) & (c < C)
    x = tl.load(X_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)  # two passes in registers: no cancellation
    w = tl.load(W_ptr + c1, mask=c1 < C, other=0.0)
    b = tl.load(B_ptr + c1, mask=c1 < C, other=0.0)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y_ptr + t * C + c, _rounded(y, ROUND_BF16).to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(Mean_ptr + t1, mean, mask=t1 < T)
    tl.store(Rstd_ptr + t1, rstd, mask=t1 < T)


@triton.jit
def _layer_norm_backward_kernel(
    DY_ptr, X_ptr, Mean_ptr, Rstd_ptr, W_ptr, R_ptr, DX_ptr, Part_ptr, T, C, n_blocks,
    BT: tl.constexpr, BC: tl.constexpr, HAS_R: tl.constexpr,
):  # fmt: skip
    """Row blocks pid, pid + P, …: ``dx = rstd·(w·dy − mean(w·dy) − x̂·mean(w·dy·x̂)) [+ r]`` per token, and this
    program's sums of ``dy·x̂`` and ``dy`` over its tokens (the weight's and the bias's gradients) in fp32."""
    pid = tl.program_id(0)
    c1 = tl.arange(0, BC)
    c = c1[None, :]
    w = tl.load(W_ptr + c1, mask=c1 < C, other=0.0)[None, :]
    dw = tl.zeros((BC,), dtype=tl.float32)
    db = tl.zeros((BC,), dtype=tl.float32)
    for blk in range(pid, n_blocks, tl.num_programs(0)):
        t1 = (blk * BT + tl.arange(0, BT)).to(tl.int64)
        t = t1[:, None]
        mask = (t < T) & (c < C)
        dy = tl.load(DY_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean_ptr + t1, mask=t1 < T, other=0.0)
        rstd = tl.load(Rstd_ptr + t1, mask=t1 < T, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w * dy
        m1 = tl.sum(wdy, axis=1) / C
        m2 = tl.sum(wdy * x_hat, axis=1) / C
        dx = (wdy - m1[:, None] - x_hat * m2[:, None]) * rstd[:, None]
        if HAS_R:
            dx += tl.load(R_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX_ptr + t * C + c, dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(Part_ptr + pid * 2 * C + c1, dw, mask=c1 < C)
    tl.store(Part_ptr + (pid * 2 + 1) * C + c1, db, mask=c1 < C)


PROBE_KERNEL = _layer_norm_cast_kernel  # how pace.kernels._dispatch tells compiled from interpreted


def _block_columns(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def layer_norm_cast(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype, out: tuple[Tensor, ...] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(LayerNorm(x) in dtype, μ, rstd)`` of (T, C) tokens by the Triton kernel; see
    ``pace.kernels.layer_norm_cast``."""
    T, C = x.shape
    if out is None:
        stats = [torch.empty(T, device=x.device, dtype=torch.float32) for _ in range(2)]  # separate: no aliases
        out = (torch.empty((T, C), device=x.device, dtype=dtype), *stats)
    y, mean, rstd = out
    if y.numel():
        _layer_norm_cast_kernel[(triton.cdiv(T, NORM_ROWS),)](
            x, weight, bias, y, mean, rstd, T, C, eps, BT=NORM_ROWS, BC=_block_columns(C),
            ROUND_BF16=_INTERPRETED and dtype == torch.bfloat16, num_warps=4,
        )  # fmt: skip
    return y, mean, rstd


def layer_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    residual_grad: Tensor | None,
    out: Tensor | None = None,
    partials: int = NORM_PARTIALS,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx [+ residual_grad], dweight, dbias)`` of (T, C) tokens by the Triton kernel; see
    ``pace.kernels.layer_norm_backward``."""
    T, C = x.shape
    dx = torch.empty((T, C), device=x.device, dtype=x.dtype) if out is None else out
    n_blocks = triton.cdiv(T, NORM_ROWS)
    programs = max(1, min(n_blocks, partials))
    part = torch.zeros((programs, 2, C), device=x.device, dtype=torch.float32)
    if dx.numel():
        _layer_norm_backward_kernel[(programs,)](
            dy, x, mean, rstd, weight, residual_grad if residual_grad is not None else dy, dx, part, T, C, n_blocks,
            BT=NORM_ROWS, BC=_block_columns(C), HAS_R=residual_grad is not None, num_warps=4,
        )  # fmt: skip
    return dx, part[:, 0].sum(0), part[:, 1].sum(0)  # two sums: outputs of a custom op may not alias
