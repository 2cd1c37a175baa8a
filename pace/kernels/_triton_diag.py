"""Triton kernels of the fused mixer's diag-form memberships, forward and backward.

Imported lazily by ``pace.kernels._dispatch``. One program per (image, 16 tokens), as ``_triton_mixer``'s
membership kernels, whose helpers they share. The launchers assume what the custom ops in
``pace.kernels.diag_ops`` check: contiguous (B, N, ·) activations, float32 ``keep`` (B, K, p) and float32 scalars
``[τ, α, β]``. ``out`` arguments exist so that tests can hand in poisoned buffers.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from pace.kernels._triton_mixer import (
    _INTERPRETED,
    BLOCK_TOKENS,
    TINY,
    _head_columns,
    _load_memberships,
    _program_indices,
    _rounded,
    _softmax_backward,
    _softmax_store,
    _store_partials,
)


@triton.jit
def _head_tiles(Keep_ptr, b, n3, k3, p3, N, K, p):
    """The program's (BN, BK, BP) mask and offsets into (B, N, K·p), and keep (1, BK, BP) of image b."""
    mask, off = _head_columns(b, n3, k3, p3, N, K, p, K * p)
    keep = tl.load(Keep_ptr + (b * K + k3) * p + p3, mask=(k3 < K) & (p3 < p), other=0.0)
    return mask, off, keep


@triton.jit
def _diag_fwd_kernel(
    Aw_ptr, Keep_ptr, S_ptr,  # in: a_w (B, N, Kp), keep (B, K, p), [τ, α, β]
    A_ptr, Z_ptr, Pi_ptr, Sq_ptr,  # out: a and z like a_w, π and ‖col‖² (B, N, K)
    N, K, p,
    TINY_: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """‖col_k‖² = Σ_p keep² a², π = softmax_k(‖col_k‖/τ), a rounded, z = π_k (1 − keep_k) a_k for BN tokens."""
    b, n2, k2, n3, k3, _, p3, tau, _, _ = _program_indices(S_ptr, BN, BK, 16, BP)
    mask, off, keep = _head_tiles(Keep_ptr, b, n3, k3, p3, N, K, p)
    a = tl.load(Aw_ptr + off, mask=mask, other=0.0)
    sq = tl.sum(a * a * (keep * keep), axis=2)  # (BN, BK)
    pi = _softmax_store(Pi_ptr, Sq_ptr, sq, b, n2, k2, N, K, tau, TINY_)
    tl.store(A_ptr + off, _rounded(a, ROUND_BF16).to(A_ptr.dtype.element_ty), mask=mask)
    z = _rounded(a * pi[:, :, None] * (1 - keep), ROUND_BF16)
    tl.store(Z_ptr + off, z.to(Z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _diag_bwd_kernel(
    GQ_ptr, Pe_ptr, GU_ptr, A_ptr,  # in: ∂L/∂Q_e and x̂Q_e (B, N, c_e), ∂L/∂U and a (B, N, Kp)
    Pi_ptr, Sq_ptr, Gpi_ptr, Keep_ptr, S_ptr,  # in: π, ‖col‖², ∂L/∂π (B, N, K), keep (B, K, p), [τ, α, β]
    Abar_ptr, Kbar_ptr, Part_ptr,  # out: ā, per-program ∂L/∂keep (B, programs, K, p), (programs, 3) partial sums
    N, K, p, ce,
    TINY_: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
    ROUND_BF16: tl.constexpr, HAS_GPI: tl.constexpr,
):  # fmt: skip
    """Backward of the forward kernel for BN tokens: ā, and this program's partial sums of ∂L/∂keep and α, β, τ."""
    b, n2, k2, n3, k3, _, p3, tau, _, beta = _program_indices(S_ptr, BN, BK, 16, BP)
    mask, off, keep = _head_tiles(Keep_ptr, b, n3, k3, p3, N, K, p)
    pi, sq, g_pi = _load_memberships(Pi_ptr, Sq_ptr, Gpi_ptr, b, n2, k2, N, K, HAS_GPI)
    # α: −<gQ_e, x̂Q_e> over the program's tokens.
    jc = tl.arange(0, BC)[None, :]
    mask_c = (n2 < N) & (jc < ce)
    g_qe = tl.load(GQ_ptr + (b * N + n2) * ce + jc, mask=mask_c, other=0.0).to(tl.float32)
    p_e = tl.load(Pe_ptr + (b * N + n2) * ce + jc, mask=mask_c, other=0.0).to(tl.float32)
    alpha_part = -tl.sum(tl.sum(g_qe * p_e, axis=1), axis=0)
    g_u = tl.load(GU_ptr + off, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = g_u * a
    # ∂L/∂π_k through −β zUᵀ: h_k = −Σ_p gU a (1 − keep).
    h = -tl.sum(u * (1 - keep), axis=2)
    beta_part, tau_part, sq_bar = _softmax_backward(pi, sq, h, g_pi, tau, beta, TINY_)
    # ā = −βπ (1 − keep) gU + 2 ∂‖col‖² keep² a; ∂keep = β Σ_n π gU a + 2 keep Σ_n ∂‖col‖² a².
    a_bar = g_u * (-beta * pi)[:, :, None] * (1 - keep) + a * (2 * sq_bar)[:, :, None] * (keep * keep)
    tl.store(Abar_ptr + off, _rounded(a_bar, ROUND_BF16).to(Abar_ptr.dtype.element_ty), mask=mask)
    keep2 = tl.sum(keep, axis=0)  # (BK, BP)
    keep_bar = beta * tl.sum(pi[:, :, None] * u, axis=0) + 2 * keep2 * tl.sum(sq_bar[:, :, None] * a * a, axis=0)
    row = b * tl.num_programs(1) + tl.program_id(1)
    kk = tl.arange(0, BK)[:, None]
    pp = tl.arange(0, BP)[None, :]
    tl.store(Kbar_ptr + (row * K + kk) * p + pp, keep_bar, mask=(kk < K) & (pp < p))
    _store_partials(Part_ptr, b, alpha_part, beta_part, tau_part)


PROBE_KERNEL = _diag_fwd_kernel  # how pace.kernels._dispatch tells compiled from interpreted


def _blocks(K: int, p: int) -> dict:
    return {"TINY_": TINY, "BN": BLOCK_TOKENS, "BK": triton.next_power_of_2(K), "BP": triton.next_power_of_2(p)}


def diag_memberships(a_w: Tensor, keep: Tensor, scalars: Tensor, dtype: torch.dtype, out: tuple | None = None):
    """``(a, z, π, ‖col‖²)`` by the Triton kernel; see ``pace.kernels.diag_memberships``."""
    B, N, d = a_w.shape
    K, p = keep.shape[1], keep.shape[2]
    if out is None:
        per_head = torch.empty((B, N, K), device=a_w.device, dtype=torch.float32)
        copies = (torch.empty_like(a_w, dtype=dtype), torch.empty_like(a_w, dtype=dtype))
        out = (*copies, per_head, torch.empty_like(per_head))
    a, z, pi, sq = out
    if B * N > 0:
        _diag_fwd_kernel[(B, triton.cdiv(N, BLOCK_TOKENS))](
            a_w, keep, scalars, a, z, pi, sq, N, K, p, **_blocks(K, p),
            ROUND_BF16=_INTERPRETED and dtype == torch.bfloat16, num_warps=4,
        )  # fmt: skip
    return out


def diag_memberships_backward(
    g_Qe: Tensor, P_e: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, keep: Tensor,
    scalars: Tensor, out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(ā, ∂L/∂keep, [α, β, τ partial sums])`` by the Triton kernel; see ``pace.kernels``."""
    B, N, d = a.shape
    K, p = keep.shape[1], keep.shape[2]
    ce = g_Qe.shape[-1]
    programs = triton.cdiv(N, BLOCK_TOKENS)
    a_bar = torch.empty_like(a) if out is None else out
    keep_bar = torch.zeros((B, programs, K, p), device=a.device, dtype=torch.float32)
    partials = torch.zeros((B * programs, 3), device=a.device, dtype=torch.float32)
    if B * N > 0:
        _diag_bwd_kernel[(B, programs)](
            g_Qe, P_e, g_U, a, pi, sq, pi if g_pi is None else g_pi, keep, scalars, a_bar, keep_bar, partials,
            N, K, p, ce, **_blocks(K, p), BC=triton.next_power_of_2(ce),
            ROUND_BF16=_INTERPRETED and a.dtype == torch.bfloat16, HAS_GPI=g_pi is not None, num_warps=4,
        )  # fmt: skip
    return a_bar, keep_bar.sum(1), partials.sum(0)
