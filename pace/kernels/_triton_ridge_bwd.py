"""Triton kernels of the ridge backward's c × c work (``ridge_gradient_matrix``, ``ridge_radial_diagonal``).

Imported lazily by ``pace.kernels._dispatch``. The whole chain runs in one program per matrix as one register tile
(c ≤ 32, padded to 16 or 32); for larger c only the radial term after G_s, one program per (matrix, 16 rows). The
launchers assume what the custom ops check: contiguous float32 (B, c, c) matrices and scales (B, 1, c). ``out``
exists so that tests can hand in a poisoned buffer.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_SIZE = 32
COLUMN_NORM_FLOOR = 1e-12  # as pace.kernels.ridge


@triton.jit
def _load_matrices(W_ptr, F_ptr, G_ptr, off, mask):
    """The same (rows, columns) tile of W, F_s and G."""
    W = tl.load(W_ptr + off, mask=mask, other=0.0)
    return W, tl.load(F_ptr + off, mask=mask, other=0.0), tl.load(G_ptr + off, mask=mask, other=0.0)


@triton.jit
def _with_radial_diagonal(W, F, G, Gs, s_j, s_k, diagonal, eps, FLOOR: tl.constexpr):
    """Rows j of ``Γ = G_s + 2 diag(ρ/s²)`` from the same rows of W, F_s, G, G_s (columns k), fp32.

    ρ_j/s_j² = ((Σ_k W_jk F_s,jk + ½ε s_j² G_s,jj) / s_j − ½ Σ_k G_jk G_s,jk s_k) / s_j, 0 where s_j was clamped.
    """
    rows = tl.sum(W * F, axis=1) + 0.5 * eps * s_j * s_j * tl.sum(tl.where(diagonal, Gs, 0.0), axis=1)
    rows = rows / s_j - 0.5 * tl.sum(G * Gs * s_k[None, :], axis=1)
    rho = tl.where(s_j > FLOOR, rows / s_j, 0.0)
    return Gs + tl.where(diagonal, 2 * rho[:, None], 0.0)


@triton.jit
def _ridge_gradient_kernel(W_ptr, F_ptr, G_ptr, S_ptr, O_ptr, c, eps, coef, FLOOR: tl.constexpr, BC: tl.constexpr):
    """coef·Γ, Γ = G_s + 2 diag(ρ/s²) with G_s = F_s(A + Aᵀ)F_sᵀ, A = F_sᵀW, for one matrix (fp32 products)."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BC)
    mask = (i[:, None] < c) & (i[None, :] < c)
    off = b * c * c + i[:, None] * c + i[None, :]
    W, F, G = _load_matrices(W_ptr, F_ptr, G_ptr, off, mask)
    s = tl.load(S_ptr + b * c + i, mask=i < c, other=1.0)
    A = tl.dot(tl.trans(F), W, input_precision="ieee")
    Gs = tl.dot(tl.dot(F, A + tl.trans(A), input_precision="ieee"), tl.trans(F), input_precision="ieee")
    out = _with_radial_diagonal(W, F, G, Gs, s, s, i[:, None] == i[None, :], eps, FLOOR)
    tl.store(O_ptr + off, coef * out, mask=mask)


@triton.jit
def _radial_diagonal_kernel(
    W_ptr, F_ptr, G_ptr, Gs_ptr, S_ptr, O_ptr, c, eps, coef,
    FLOOR: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """BR rows of coef·Γ, Γ = G_s + 2 diag(ρ/s²) of one matrix, G_s given (any c: a row block of BC ≥ c columns);
    with HALF, G_s = H + Hᵀ from H given (its rows and its columns read)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BR + tl.arange(0, BR)
    k = tl.arange(0, BC)
    mask = (j[:, None] < c) & (k[None, :] < c)
    off = b * c * c + j[:, None] * c + k[None, :]
    W, F, G = _load_matrices(W_ptr, F_ptr, G_ptr, off, mask)
    Gs = tl.load(Gs_ptr + off, mask=mask, other=0.0)
    if HALF:
        Gs += tl.load(Gs_ptr + b * c * c + k[None, :] * c + j[:, None], mask=mask, other=0.0)
    s_j = tl.load(S_ptr + b * c + j, mask=j < c, other=1.0)
    s_k = tl.load(S_ptr + b * c + k, mask=k < c, other=1.0)
    out = _with_radial_diagonal(W, F, G, Gs, s_j, s_k, j[:, None] == k[None, :], eps, FLOOR)
    tl.store(O_ptr + off, coef * out, mask=mask)


PROBE_KERNEL = _ridge_gradient_kernel  # how pace.kernels._dispatch tells compiled from interpreted


def ridge_gradient_matrix(
    W: Tensor, F_s: Tensor, G: Tensor, scale: Tensor, eps: float, coef: float = 1.0, out: Tensor | None = None
) -> Tensor:
    """coef·Γ by the Triton kernel; see ``pace.kernels.ridge_gradient_matrix``."""
    B, c, _ = W.shape
    out = torch.empty((B, c, c), device=W.device, dtype=torch.float32) if out is None else out
    if out.numel():
        _ridge_gradient_kernel[(B,)](
            W, F_s, G, scale, out, c, eps, coef, FLOOR=COLUMN_NORM_FLOOR, BC=max(16, triton.next_power_of_2(c)),
            num_warps=1 if c <= 16 else 2,
        )  # fmt: skip
    return out


RADIAL_ROWS = 16


def ridge_radial_diagonal(
    W: Tensor,
    F_s: Tensor,
    G: Tensor,
    G_s: Tensor,
    scale: Tensor,
    eps: float,
    coef: float = 1.0,
    out: Tensor | None = None,
    half: bool = False,
) -> Tensor:
    """coef·Γ from a given G_s (or its half H, G_s = H + Hᵀ) by the Triton row kernel; see
    ``pace.kernels.ridge_radial_diagonal``."""
    B, c, _ = W.shape
    out = torch.empty((B, c, c), device=W.device, dtype=torch.float32) if out is None else out
    if out.numel():
        _radial_diagonal_kernel[(B, triton.cdiv(c, RADIAL_ROWS))](
            W, F_s, G, G_s, scale, out, c, eps, coef, FLOOR=COLUMN_NORM_FLOOR, BR=RADIAL_ROWS,
            BC=max(16, triton.next_power_of_2(c)), HALF=half, num_warps=4,
        )  # fmt: skip
    return out
