"""Triton kernels of the fused PACE mixer's elementwise work (full Compress form): memberships forward and backward.

Imported lazily by ``pace.kernels._dispatch`` (importing it imports Triton). One program per (image, 16 tokens).
The launchers assume what the custom ops in ``pace.kernels.mixer_ops`` check: contiguous (B, N, ·) activations
in bfloat16/float16/float32, float32 ``M`` (B, K, r, r) and float32 scalars ``[τ, α, β]``. ``out`` arguments exist
so that tests can hand in poisoned buffers and check that every element is written.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even: under it, stores pre-round the bits.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
TINY = float(torch.finfo(torch.float32).tiny)  # the clamp of ‖col‖² before its square root, as pace.layers.mixer
BLOCK_TOKENS = 16  # tl.dot needs at least 16 rows


@triton.jit
def _rounded(x, ROUND_BF16: tl.constexpr):
    """``x`` (fp32) with its bits pre-rounded so that the interpreter's truncation to bf16 rounds to nearest even."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
        # Zeros and subnormals stay as they are: 0 + 0x7FFF is a subnormal the interpreter would not truncate to 0.
        x = tl.where((bits & 0x7F800000) == 0, x, up)
    return x


@triton.jit
def _head_quadratic(P_ptr, M_ptr, b, k, n2, N, K, r, BR: tl.constexpr):
    """``(P_k, P_k M_k)`` for head k of BN tokens: P_k (BN, BR) from P's Compress columns, M_k (r × r), fp32."""
    jr = tl.arange(0, BR)
    Kr = K * r
    cols = Kr + k * r + jr[None, :]
    pc = tl.load(P_ptr + (b * N + n2) * (2 * Kr) + cols, mask=(n2 < N) & (jr[None, :] < r), other=0.0).to(tl.float32)
    m = tl.load(
        M_ptr + ((b * K + k) * r + jr[:, None]) * r + jr[None, :], mask=(jr[:, None] < r) & (jr[None, :] < r), other=0.0
    )
    return pc, tl.dot(pc, m, input_precision="ieee")


@triton.jit
def _program_indices(S_ptr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """This program's image b, its tokens × heads index grids (2-D, and 3-D with the r or p axis) and [τ, α, β]."""
    b = tl.program_id(0).to(tl.int64)
    n1 = tl.program_id(1) * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    r3 = tl.arange(0, BR)[None, None, :]
    p3 = tl.arange(0, BP)[None, None, :]
    tau = tl.load(S_ptr)
    alpha = tl.load(S_ptr + 1)
    beta = tl.load(S_ptr + 2)
    return b, n1[:, None], kk[None, :], n1[:, None, None], kk[None, :, None], r3, p3, tau, alpha, beta


@triton.jit
def _head_columns(b, n3, k3, j3, N, K, width, row):
    """Mask and offsets of the program's (BN, BK, BJ) tile of head k's columns k·width + j, rows of ``row`` elements."""
    return (n3 < N) & (k3 < K) & (j3 < width), (b * N + n3) * row + k3 * width + j3


@triton.jit
def _softmax_store(Pi_ptr, Sq_ptr, sq, b, n2, k2, N, K, tau, TINY_: tl.constexpr):
    """π = softmax_k(max(‖col_k‖², tiny)^½ / τ) of the program's (BN, BK) ‖col‖²; π and ‖col‖² stored, π returned."""
    root = tl.sqrt(tl.maximum(sq, TINY_))
    logits = tl.where(k2 < K, root / tau, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    pi = e / tl.sum(e, axis=1)[:, None]
    mask2 = (n2 < N) & (k2 < K)
    tl.store(Pi_ptr + (b * N + n2) * K + k2, pi, mask=mask2)
    tl.store(Sq_ptr + (b * N + n2) * K + k2, sq, mask=mask2)
    return pi


@triton.jit
def _load_memberships(Pi_ptr, Sq_ptr, Gpi_ptr, b, n2, k2, N, K, HAS_GPI: tl.constexpr):
    """The program's (BN, BK) π, ‖col‖² and π's cotangent (0 without one)."""
    mask2 = (n2 < N) & (k2 < K)
    off2 = (b * N + n2) * K + k2
    pi = tl.load(Pi_ptr + off2, mask=mask2, other=0.0)
    sq = tl.load(Sq_ptr + off2, mask=mask2, other=0.0)
    g_pi = tl.load(Gpi_ptr + off2, mask=mask2 & HAS_GPI, other=0.0).to(tl.float32)  # without: π unused, 0
    return pi, sq, g_pi


@triton.jit
def _softmax_backward(pi, sq, h, g_pi, tau, beta, TINY_: tl.constexpr):
    """From h_k = ∂(update)/∂(βπ_k): the β and τ partial sums and ∂L/∂‖col‖² (softmax, then ℓ = ‖col‖/τ)."""
    beta_part = tl.sum(tl.sum(pi * h, axis=1), axis=0)
    pi_bar = g_pi + beta * h
    l_bar = pi * (pi_bar - tl.sum(pi_bar * pi, axis=1)[:, None])  # softmax backward
    root = tl.sqrt(tl.maximum(sq, TINY_))
    tau_part = -tl.sum(tl.sum(l_bar * root, axis=1), axis=0) / (tau * tau)  # ∂L/∂τ = −Σ ∂ℓ ‖col‖ / τ²
    sq_bar = tl.where(sq >= TINY_, l_bar / (2 * tau * root), 0.0)
    return beta_part, tau_part, sq_bar


@triton.jit
def _memberships_fwd_kernel(
    P_ptr, A_ptr, M_ptr, S_ptr,  # in: P (B, N, 2Kr), a (B, N, Kp), M (B, K, r, r), [τ, α, β]
    Ps_ptr, Z_ptr, Pi_ptr, Sq_ptr,  # out: Ps like P, z like a, π and ‖col‖² (B, N, K)
    N, K, r, p,
    TINY_: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """‖col_k‖² = P_k M_k P_kᵀ, π = softmax_k(‖col_k‖/τ), Ps = P ⊙ [−α | βπ_k], z = π_k a_k for BN tokens."""
    b, n2, k2, n3, k3, r3, p3, tau, alpha, beta = _program_indices(S_ptr, BN, BK, BR, BP)
    Kr = K * r
    sq = tl.zeros((BN, BK), dtype=tl.float32)
    for k in range(K):
        pc, t = _head_quadratic(P_ptr, M_ptr, b, k, n2, N, K, r, BR)
        sq = tl.where(k2 == k, tl.sum(t * pc, axis=1)[:, None], sq)
    pi = _softmax_store(Pi_ptr, Sq_ptr, sq, b, n2, k2, N, K, tau, TINY_)
    # Ps: the Expand columns scaled by −α, head k's Compress columns by βπ_k.
    mask_r, off = _head_columns(b, n3, k3, r3, N, K, r, 2 * Kr)
    pe = tl.load(P_ptr + off, mask=mask_r, other=0.0).to(tl.float32)
    tl.store(Ps_ptr + off, _rounded(pe * -alpha, ROUND_BF16).to(Ps_ptr.dtype.element_ty), mask=mask_r)
    pc3 = tl.load(P_ptr + off + Kr, mask=mask_r, other=0.0).to(tl.float32)
    ps = _rounded(pc3 * (beta * pi)[:, :, None], ROUND_BF16)
    tl.store(Ps_ptr + off + Kr, ps.to(Ps_ptr.dtype.element_ty), mask=mask_r)
    # z = π ⊙ a, head k's p columns scaled by π_k.
    mask_p, off_a = _head_columns(b, n3, k3, p3, N, K, p, K * p)
    a = tl.load(A_ptr + off_a, mask=mask_p, other=0.0).to(tl.float32)
    tl.store(Z_ptr + off_a, _rounded(a * pi[:, :, None], ROUND_BF16).to(Z_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _store_head_cotangents(
    P_ptr,
    M_ptr,
    GR_ptr,
    Pbar_ptr,
    Pcw_ptr,
    b,
    n2,
    k2,
    N,
    K,
    r,
    pi,
    sq_bar,
    beta,
    BR: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """The Compress columns of P̄ and the weighted coordinates for M̄, head by head, for the program's tokens."""
    jr = tl.arange(0, BR)
    Kr = K * r
    # Head k's Compress columns: P̄_k = βπ_k gV_k + 2 ∂‖col_k‖² (P_k M_k); P_k ∂‖col_k‖² for M̄.
    for k in range(K):
        pc, t = _head_quadratic(P_ptr, M_ptr, b, k, n2, N, K, r, BR)
        col = (b * N + n2) * (2 * Kr) + Kr + k * r + jr[None, :]
        mask_k = (n2 < N) & (jr[None, :] < r)
        gv = tl.load(GR_ptr + col, mask=mask_k, other=0.0).to(tl.float32)
        pi_k = tl.sum(tl.where(k2 == k, pi, 0.0), axis=1)[:, None]
        sqb_k = tl.sum(tl.where(k2 == k, sq_bar, 0.0), axis=1)[:, None]
        pbar = _rounded(beta * pi_k * gv + 2 * sqb_k * t, ROUND_BF16)
        tl.store(Pbar_ptr + col, pbar.to(Pbar_ptr.dtype.element_ty), mask=mask_k)
        pcw = _rounded(pc * sqb_k, ROUND_BF16)
        tl.store(Pcw_ptr + (b * N + n2) * Kr + k * r + jr[None, :], pcw.to(Pcw_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _store_partials(Part_ptr, b, alpha_part, beta_part, tau_part):
    """This program's partial sums of the α, β and τ gradients, in its row of the partials buffer."""
    row = (b * tl.num_programs(1) + tl.program_id(1)) * 3
    tl.store(Part_ptr + row, alpha_part)
    tl.store(Part_ptr + row + 1, beta_part)
    tl.store(Part_ptr + row + 2, tau_part)


@triton.jit
def _memberships_bwd_kernel(
    GR_ptr, P_ptr, GU_ptr, A_ptr, Pi_ptr, Sq_ptr, Gpi_ptr, M_ptr, S_ptr,  # in: ∂L/∂R, P, ∂L/∂U, a, π, ‖col‖², ∂L/∂π
    Pbar_ptr, Abar_ptr, Pcw_ptr, Part_ptr,  # out: P̄, ā, P_c ⊙ ∂‖col‖², (programs, 3) partial sums
    N, K, r, p,
    TINY_: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
    ROUND_BF16: tl.constexpr, HAS_GPI: tl.constexpr,
):  # fmt: skip
    """Backward of the forward kernel for BN tokens; the three scalar partial sums go to this program's row."""
    b, n2, k2, n3, k3, r3, p3, tau, alpha, beta = _program_indices(S_ptr, BN, BK, BR, BP)
    Kr = K * r
    pi, sq, g_pi = _load_memberships(Pi_ptr, Sq_ptr, Gpi_ptr, b, n2, k2, N, K, HAS_GPI)
    mask_r, off = _head_columns(b, n3, k3, r3, N, K, r, 2 * Kr)
    mask_p, off_a = _head_columns(b, n3, k3, p3, N, K, p, K * p)
    g_qe = tl.load(GR_ptr + off, mask=mask_r, other=0.0).to(tl.float32)
    p_e = tl.load(P_ptr + off, mask=mask_r, other=0.0).to(tl.float32)
    g_v = tl.load(GR_ptr + off + Kr, mask=mask_r, other=0.0).to(tl.float32)
    p_c = tl.load(P_ptr + off + Kr, mask=mask_r, other=0.0).to(tl.float32)
    g_u = tl.load(GU_ptr + off_a, mask=mask_p, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + off_a, mask=mask_p, other=0.0).to(tl.float32)
    # ∂L/∂π_k through the update: h_k = <gV_k, P_k> − <gU_k, a_k>; α: −<gQ_e, x̂Q_e>.
    h = tl.sum(g_v * p_c, axis=2) - tl.sum(g_u * a, axis=2)
    alpha_part = -tl.sum(tl.sum(tl.sum(g_qe * p_e, axis=2), axis=1), axis=0)
    beta_part, tau_part, sq_bar = _softmax_backward(pi, sq, h, g_pi, tau, beta, TINY_)
    tl.store(Pbar_ptr + off, _rounded(g_qe * -alpha, ROUND_BF16).to(Pbar_ptr.dtype.element_ty), mask=mask_r)
    a_bar = _rounded(g_u * (-beta * pi)[:, :, None], ROUND_BF16)
    tl.store(Abar_ptr + off_a, a_bar.to(Abar_ptr.dtype.element_ty), mask=mask_p)
    _store_head_cotangents(
        P_ptr, M_ptr, GR_ptr, Pbar_ptr, Pcw_ptr, b, n2, k2, N, K, r, pi, sq_bar, beta, BR, ROUND_BF16
    )
    _store_partials(Part_ptr, b, alpha_part, beta_part, tau_part)


@triton.jit
def _cast_dot_kernel(
    G_ptr, X_ptr, T_ptr, Out_ptr, Part_ptr, n, per_batch,
    BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr, HAS_T: tl.constexpr,
):  # fmt: skip
    """One block of ``g`` (times its batch entry's scale t_b with HAS_T): its copy in Out's dtype and its part of
    ``<g, x>`` (fp32)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(G_ptr + i, mask=mask, other=0.0).to(tl.float32)
    if HAS_T:
        g *= tl.load(T_ptr + i // per_batch, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out_ptr + i, _rounded(g, ROUND_BF16).to(Out_ptr.dtype.element_ty), mask=mask)
    tl.store(Part_ptr + tl.program_id(0), tl.sum(g * x, axis=0))


@triton.jit
def _pack_bases_kernel(
    Y_ptr,
    F_ptr,
    U_ptr,
    Qc_ptr,
    R_ptr,
    d,
    c,
    K,
    r,
    p,
    stride_yb,
    stride_ym,
    stride_yc,
    stride_um,
    stride_ut,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile (m, n) of R = [Y F_s | U_k Q_k] for one image, fp32-accurate products, one rounding to R's dtype.

    Columns below c: ``Σ_j Y[m, j] F_s[j, n]``. Column c + k·r + i: ``Σ_q U[m, k·p + q] Q_k[q, i]``, a product with
    the block-diagonal matrix of the Q_k over the rows of the heads the tile's columns belong to.
    """
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    n0 = tl.program_id(2) * BN
    n = n0 + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    ncols = c + K * r
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if n0 < c:
        for k0 in range(0, c, BK):
            k = k0 + kk
            y = tl.load(
                Y_ptr + b * stride_yb + m[:, None] * stride_ym + k[None, :] * stride_yc,
                mask=(m[:, None] < d) & (k[None, :] < c),
                other=0.0,
            ).to(tl.float32)  # a bf16 Y converts exactly
            f = tl.load(
                F_ptr + (b * c + k[:, None]) * c + n[None, :], mask=(k[:, None] < c) & (n[None, :] < c), other=0.0
            )
            acc += tl.dot(y, f, input_precision=PRECISION)
    if n0 + BN > c:
        j = tl.maximum(n - c, 0)  # (BN,) column within V (0 for Expand columns, masked below)
        head = j // r
        valid = (n >= c) & (n < ncols)
        first = tl.maximum(n0 - c, 0) // r
        last = (tl.minimum(n0 + BN, ncols) - c - 1) // r
        for t0 in range(first * p, (last + 1) * p, BK):
            t = t0 + kk  # rows of U's columns, i.e. head·p + q
            t_ok = t < (last + 1) * p
            u_off = m[:, None] * stride_um + t[None, :] * stride_ut
            u = tl.load(U_ptr + u_off, mask=(m[:, None] < d) & t_ok[None, :], other=0.0)
            same = ((t // p)[:, None] == head[None, :]) & valid[None, :] & t_ok[:, None]
            q = tl.load(
                Qc_ptr + ((b * K + head[None, :]) * p + (t % p)[:, None]) * r + (j % r)[None, :], mask=same, other=0.0
            )
            acc += tl.dot(u, q, input_precision=PRECISION)
    out = _rounded(acc, ROUND_BF16).to(R_ptr.dtype.element_ty)
    tl.store(R_ptr + (b * d + m[:, None]) * ncols + n[None, :], out, mask=(m[:, None] < d) & (n[None, :] < ncols))


PROBE_KERNEL = _memberships_fwd_kernel  # how pace.kernels._dispatch tells compiled from interpreted


def _blocks(K: int, r: int, p: int) -> dict:
    return {
        "TINY_": TINY,
        "BN": BLOCK_TOKENS,
        "BK": triton.next_power_of_2(K),
        "BR": max(16, triton.next_power_of_2(r)),
        "BP": triton.next_power_of_2(p),
    }


def mixer_memberships(P: Tensor, a: Tensor, M: Tensor, scalars: Tensor, out: tuple | None = None) -> tuple:
    """``(Ps, z, π, ‖col‖²)`` by the Triton kernel; see ``pace.kernels.mixer_memberships``."""
    B, N, _ = P.shape
    K, r = M.shape[1], M.shape[2]
    p = a.shape[-1] // K
    if out is None:
        out = (
            torch.empty_like(P),
            torch.empty_like(a),
            torch.empty((B, N, K), device=P.device, dtype=torch.float32),
            torch.empty((B, N, K), device=P.device, dtype=torch.float32),
        )
    Ps, z, pi, sq = out
    if B * N == 0:
        return out
    _memberships_fwd_kernel[(B, triton.cdiv(N, BLOCK_TOKENS))](
        P, a, M, scalars, Ps, z, pi, sq, N, K, r, p,
        **_blocks(K, r, p), ROUND_BF16=_INTERPRETED and P.dtype == torch.bfloat16, num_warps=4,
    )  # fmt: skip
    return out


def mixer_memberships_backward(
    g_R: Tensor, P: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, M: Tensor,
    scalars: Tensor, out: tuple | None = None,
) -> tuple:  # fmt: skip
    """``(P̄, ā, P_c ⊙ ∂‖col‖², [α, β, τ partial sums])`` by the Triton kernel; see ``pace.kernels``."""
    B, N, _ = P.shape
    K, r = M.shape[1], M.shape[2]
    p = a.shape[-1] // K
    programs = triton.cdiv(N, BLOCK_TOKENS)
    if out is None:
        out = (
            torch.empty_like(P),
            torch.empty_like(a),
            torch.empty((B, N, K * r), device=P.device, dtype=P.dtype),
        )
    P_bar, a_bar, Pc_w = out
    partials = torch.zeros((B * programs, 3), device=P.device, dtype=torch.float32)
    if B * N > 0:
        _memberships_bwd_kernel[(B, programs)](
            g_R, P, g_U, a, pi, sq, pi if g_pi is None else g_pi, M, scalars, P_bar, a_bar, Pc_w, partials, N, K, r, p,
            **_blocks(K, r, p), ROUND_BF16=_INTERPRETED and P.dtype == torch.bfloat16, HAS_GPI=g_pi is not None,
            num_warps=4,
        )  # fmt: skip
    return P_bar, a_bar, Pc_w, partials.sum(0)


CAST_DOT_BLOCK = 4096
# pack_bases' products: three TF32 tensor-core products per tile (hi·hi + hi·lo + lo·hi), fp32-accurate to about
# 1e-6 relative, where "ieee" (fp32 FMA, no tensor cores) would make this small GEMM compute-bound.
PACK_PRECISION = "tf32x3"


def cast_dot(
    g: Tensor, x: Tensor, dtype: torch.dtype, out: Tensor | None = None, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(g in dtype, <g, x> in fp32)`` (g scaled per batch entry by ``scale``) by the Triton kernel; see
    ``pace.kernels.cast_dot``."""
    out = torch.empty(g.shape, device=g.device, dtype=dtype) if out is None else out
    n = g.numel()
    programs = triton.cdiv(n, CAST_DOT_BLOCK)
    partials = torch.zeros(max(programs, 1), device=g.device, dtype=torch.float32)
    if n:
        per_batch = n // scale.numel() if scale is not None else n
        _cast_dot_kernel[(programs,)](
            g, x, scale if scale is not None else g, out, partials, n, per_batch, BLOCK=CAST_DOT_BLOCK,
            ROUND_BF16=_INTERPRETED and dtype == torch.bfloat16, HAS_T=scale is not None, num_warps=8,
        )  # fmt: skip
    return out, partials.sum()


def pack_bases(Y: Tensor, F_s: Tensor, U: Tensor, Q_c: Tensor | None, dtype: torch.dtype, out: Tensor | None = None):
    """``R = [Y F_s | U_k Q_k]`` in ``dtype`` by the Triton kernel; see ``pace.kernels.pack_bases``.

    Y and U may have any strides; F_s and Q_c must be contiguous.
    """
    B, d, c = Y.shape
    K, r, p = (Q_c.shape[0] // B, Q_c.shape[2], Q_c.shape[1]) if Q_c is not None else (0, 1, 1)
    ncols = c + K * r
    R = torch.empty((B, d, ncols), device=Y.device, dtype=dtype) if out is None else out
    if R.numel() == 0:
        return R
    BM, BN, BK = 32, 32, 32
    _pack_bases_kernel[(B, triton.cdiv(d, BM), triton.cdiv(ncols, BN))](
        Y, F_s, U, Q_c if Q_c is not None else F_s, R, d, c, K, r, p, *Y.stride(), *U.stride(),
        BM=BM, BN=BN, BK=BK, ROUND_BF16=_INTERPRETED and dtype == torch.bfloat16, PRECISION=PACK_PRECISION,
        num_warps=4,
    )  # fmt: skip
    return R
