"""Triton kernels of the ridge step (inverse Cholesky factor ``F = L⁻ᵀ``, normalised Gram) and Compress memberships.

Imported lazily by ``pace.kernels._dispatch`` (importing it imports Triton). The launchers assume what the custom
ops in ``pace.kernels.ridge`` check: 3-D inputs, float32 G, float32/bfloat16/float16 Y. ``out`` arguments exist
so that tests can hand in poisoned buffers and check that every element is written.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Interpreter quirks worked around under this flag: it multiplies half-precision tiles as raw bits (they are
# upcast to fp32 first: the same exact products) and truncates fp32 -> bf16 (pre-rounded bits give RNE).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _chol_inv_tile(A, steps, BS: tl.constexpr):
    """``L⁻¹`` (lower triangular) of the Cholesky factor of one SPD tile ``A`` (BS, BS), in registers.

    Right-looking Cholesky fused with forward substitution against I: step j takes column j of the updated
    trailing matrix as column j of L, then finishes row j of ``X = L⁻¹`` and removes it from the rows below.
    Padding rows/columns (from ``steps`` on) must hold the identity: they are decoupled (zero off-diagonal), so
    the first ``steps`` steps never touch them and they are already the identity's factor.
    """
    idx = tl.arange(0, BS)
    rows = idx[:, None]
    cols = idx[None, :]
    X = (rows == cols).to(tl.float32)
    for j in range(steps):
        col = tl.sum(tl.where(cols == j, A, 0.0), axis=1)  # (BS,) A[:, j]
        d = tl.sqrt(tl.sum(tl.where(idx == j, col, 0.0), axis=0))
        lj = tl.where(idx >= j, col / d, 0.0)  # column j of L (zero above the diagonal)
        A = A - lj[:, None] * lj[None, :]
        xj = tl.sum(tl.where(rows == j, X, 0.0), axis=0) / d  # (BS,) finished row j of L⁻¹
        X = tl.where(rows == j, xj[None, :], X - lj[:, None] * xj[None, :])
    return X


@triton.jit
def _tile(ptr, r, c, stride_r, stride_c, n):
    """The tile at row indices r (BS, 1) and column indices c (1, BS) of an n × n matrix, zero outside it."""
    return tl.load(ptr + r * stride_r + c * stride_c, mask=(r < n) & (c < n), other=0.0)


@triton.jit
def _invert_lower_blocks(F_ptr, n, stride_fr, stride_fc, rows, cols, BS: tl.constexpr, NB: tl.constexpr):
    """Second phase of the blocked kernel: with L's off-diagonal blocks in F's lower blocks and X_kkᵀ on F's
    diagonal, write the blocks of X = L⁻¹ transposed into F's upper blocks, then clear the lower ones."""
    zero = tl.zeros((BS, BS), dtype=tl.float32)
    # Blocked inversion, one column of tiles at a time: X_ik = −X_ii Σ_{j=k}^{i−1} L_ij X_jk for i > k.
    for k in range(NB):
        ck = k * BS + cols
        for i in range(k + 1, NB):
            ri = i * BS + rows
            acc = zero
            for j in range(k, i):
                rj = j * BS + rows
                cj = j * BS + cols
                Lij = _tile(F_ptr, ri, cj, stride_fr, stride_fc, n)
                # X_jk (rows of block j, columns of block k) lives transposed in F's block (k, j).
                Xjk = _tile(F_ptr, ck, rj, stride_fr, stride_fc, n)
                acc += tl.dot(Lij, Xjk, input_precision="ieee")
            ci = i * BS + cols
            Xii = _tile(F_ptr, ci, ri, stride_fr, stride_fc, n)
            Xik = -tl.dot(Xii, acc, input_precision="ieee")
            tl.store(F_ptr + ck * stride_fr + ri * stride_fc, Xik, mask=(ck < n) & (ri < n))
            tl.debug_barrier()

    # F is upper triangular: clear the lower blocks that held L.
    for k in range(NB):
        ck = k * BS + cols
        for i in range(k + 1, NB):
            ri = i * BS + rows
            tl.store(F_ptr + ri * stride_fr + ck * stride_fc, zero, mask=(ri < n) & (ck < n))


@triton.jit
def inverse_cholesky_factor_kernel(
    G_ptr,
    F_ptr,
    S_ptr,
    n,
    stride_gb,
    stride_gr,
    stride_gc,
    stride_fb,
    stride_fr,
    stride_fc,
    BS: tl.constexpr,
    NB: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """One program per matrix. ``NB == 1``: the whole (padded) matrix is one register tile.

    ``NB > 1``: blocked left-looking Cholesky over BS × BS tiles, then a blocked inversion. The output buffer is
    the only scratch: the off-diagonal blocks L_ik (i > k) of L go to F's lower blocks, the blocks X_ik of
    X = L⁻¹ to F's upper blocks (transposed, F = Xᵀ), and the lower blocks are zeroed at the end. Every write
    that a later step reads is followed by a barrier (a block-wide __syncthreads orders global memory too).

    ``HAS_SCALE``: a last pass divides row j of F by ``S[b, j]`` (``D⁻¹F``), over the program's own matrix, which it
    has just written (from L2, not another pass over memory).
    """
    b = tl.program_id(0)
    G_ptr += b.to(tl.int64) * stride_gb
    F_ptr += b.to(tl.int64) * stride_fb
    idx = tl.arange(0, BS)
    rows = idx[:, None]
    cols = idx[None, :]
    eye = rows == cols

    for k in range(NB):
        # Diagonal tile: A_kk = G_kk − Σ_{j<k} L_kj L_kjᵀ; padding (beyond n) is the identity.
        r = k * BS + rows
        c = k * BS + cols
        A = _tile(G_ptr, r, c, stride_gr, stride_gc, n).to(tl.float32)
        A = tl.where(eye & (r >= n), 1.0, A)
        for j in range(k):
            cj = j * BS + cols
            Lkj = _tile(F_ptr, r, cj, stride_fr, stride_fc, n)
            A -= tl.dot(Lkj, tl.trans(Lkj), input_precision="ieee")
        Xkk = _chol_inv_tile(A, tl.minimum(n - k * BS, BS), BS)
        # F_kk = X_kkᵀ: element X[r, c] goes to F[c, r].
        tl.store(F_ptr + c * stride_fr + r * stride_fc, Xkk, mask=(r < n) & (c < n))
        # Column of tiles below: L_ik = (G_ik − Σ_{j<k} L_ij L_kjᵀ) X_kkᵀ.
        for i in range(k + 1, NB):
            ri = i * BS + rows
            Aik = _tile(G_ptr, ri, c, stride_gr, stride_gc, n).to(tl.float32)
            for j in range(k):
                cj = j * BS + cols
                Lij = _tile(F_ptr, ri, cj, stride_fr, stride_fc, n)
                Lkj = _tile(F_ptr, r, cj, stride_fr, stride_fc, n)
                Aik -= tl.dot(Lij, tl.trans(Lkj), input_precision="ieee")
            Lik = tl.dot(Aik, tl.trans(Xkk), input_precision="ieee")
            tl.store(F_ptr + ri * stride_fr + c * stride_fc, Lik, mask=(ri < n) & (c < n))
        tl.debug_barrier()

    _invert_lower_blocks(F_ptr, n, stride_fr, stride_fc, rows, cols, BS, NB)
    if HAS_SCALE:
        tl.debug_barrier()
        S_ptr += b.to(tl.int64) * n
        for i in range(NB):
            ri = i * BS + rows
            s = tl.load(S_ptr + ri, mask=ri < n, other=1.0)  # (BS, 1): the scales of these rows
            for j in range(i, NB):  # the upper blocks; the lower ones are zero
                cj = j * BS + cols
                F_ij = _tile(F_ptr, ri, cj, stride_fr, stride_fc, n)
                tl.store(F_ptr + ri * stride_fr + cj * stride_fc, F_ij / s, mask=(ri < n) & (cj < n))


PROBE_KERNEL = inverse_cholesky_factor_kernel  # how pace.kernels._dispatch tells compiled from interpreted


def factor_tiling(c: int) -> tuple[int, int]:
    """Default ``(tile, num_warps)`` for size c: one register tile up to c = 32, else 32 × 32 tiles.

    Unmeasured guesses (see docs/perf_notes.md); ``scripts/bench_kernels.py --sweep`` times the alternatives.
    """
    if c <= 16:
        return 16, 1
    if c <= 32:
        return 32, 2
    return 32, 4


def inverse_cholesky_factor(
    G: Tensor,
    out: Tensor | None = None,
    tile: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
    row_scale: Tensor | None = None,
) -> Tensor:
    """``F = chol(G)⁻ᵀ`` of float32 SPD matrices G (B, c, c) by the Triton kernel, or ``D⁻¹F`` with ``D`` the
    contiguous float32 ``row_scale`` (B, c) on its diagonal; see ``pace.kernels``.

    ``tile`` (a power of two >= 16) and ``num_warps`` override :func:`factor_tiling`; a tile >= c means one
    register tile per matrix. ``num_stages`` > 1 lets Triton prefetch the tiles of the inner tile loops (they
    only read tiles written before the last barrier).
    """
    batch, c = G.shape[0], G.shape[-1]
    F = torch.empty((batch, c, c), device=G.device, dtype=torch.float32) if out is None else out
    if batch == 0 or c == 0:
        return F
    default_tile, default_warps = factor_tiling(c)
    BS = tile or default_tile
    inverse_cholesky_factor_kernel[(batch,)](
        G,
        F,
        row_scale if row_scale is not None else G,
        c,
        *G.stride(),
        *F.stride(),
        BS=BS,
        NB=triton.cdiv(c, BS),
        HAS_SCALE=row_scale is not None,
        num_warps=num_warps or default_warps,
        num_stages=num_stages,
    )
    return F


@triton.jit
def _normalized_gram_kernel(
    Y_ptr,
    S_ptr,
    G_ptr,
    m,
    n,
    eps,
    stride_yb,
    stride_ym,
    stride_yc,
    stride_gb,
    stride_gr,
    stride_gc,
    BT: tl.constexpr,
    BM: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Tile (ti, tj) of ``G = ŶᵀŶ + εI`` with ``Ŷ = Y / max(‖columns‖, 1e-12)`` from one pass over two column strips.

    The raw product YᵀY is accumulated in fp32 (bf16 operands on tensor cores are exact products) together with
    the squared column norms of both strips; the scaling is applied to the fp32 tile at the end. Diagonal tiles
    also write the column scales.
    """
    b = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    Y_ptr += b.to(tl.int64) * stride_yb
    ci = ti * BT + tl.arange(0, BT)
    cj = tj * BT + tl.arange(0, BT)
    mm = tl.arange(0, BM)
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    ssi = tl.zeros((BT,), dtype=tl.float32)
    ssj = tl.zeros((BT,), dtype=tl.float32)
    for m0 in range(0, m, BM):
        rows = m0 + mm
        # Strip i loaded transposed, (BT, BM); strip j as is, (BM, BT).
        yi = tl.load(
            Y_ptr + rows[None, :] * stride_ym + ci[:, None] * stride_yc,
            mask=(rows[None, :] < m) & (ci[:, None] < n),
            other=0.0,
        )
        yj = tl.load(
            Y_ptr + rows[:, None] * stride_ym + cj[None, :] * stride_yc,
            mask=(rows[:, None] < m) & (cj[None, :] < n),
            other=0.0,
        )
        if UPCAST:
            acc = tl.dot(yi.to(tl.float32), yj.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(yi, yj, acc, input_precision="ieee")
        else:
            acc = tl.dot(yi, yj, acc)
        yi32 = yi.to(tl.float32)
        yj32 = yj.to(tl.float32)
        ssi += tl.sum(yi32 * yi32, axis=1)
        ssj += tl.sum(yj32 * yj32, axis=0)
    si = tl.maximum(tl.sqrt(ssi), 1e-12)
    sj = tl.maximum(tl.sqrt(ssj), 1e-12)
    Gt = acc / si[:, None] / sj[None, :]
    Gt = tl.where(ci[:, None] == cj[None, :], Gt + eps, Gt)
    G_ptr += b.to(tl.int64) * stride_gb
    tl.store(G_ptr + ci[:, None] * stride_gr + cj[None, :] * stride_gc, Gt, mask=(ci[:, None] < n) & (cj[None, :] < n))
    tl.store(S_ptr + b.to(tl.int64) * n + ci, si, mask=(ci < n) & (ti == tj))


def normalized_gram(Y: Tensor, eps: float, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(scale (B, 1, c), G (B, c, c))``, both float32, by the Triton kernel; see ``pace.kernels``."""
    batch, m, c = Y.shape
    if out is None:
        out = (
            torch.empty((batch, 1, c), device=Y.device, dtype=torch.float32),
            torch.empty((batch, c, c), device=Y.device, dtype=torch.float32),
        )
    scale, G = out  # scale must be contiguous: the kernel writes it at b * c + j
    if batch == 0 or c == 0:
        return scale, G
    BT = 16 if c <= 16 else 32
    nt = triton.cdiv(c, BT)
    _normalized_gram_kernel[(batch, nt, nt)](
        Y,
        scale,
        G,
        m,
        c,
        float(eps),
        *Y.stride(),
        *G.stride(),
        BT=BT,
        BM=64,
        IEEE=Y.dtype == torch.float32,
        UPCAST=_INTERPRETED and Y.dtype != torch.float32,
        num_warps=4,
    )
    return scale, G


@triton.jit
def _memberships_kernel(
    A_ptr,
    C_ptr,
    tau_ptr,
    W_ptr,
    P_ptr,
    N,
    K,
    p,
    stride_ab,
    stride_an,
    stride_ak,
    stride_ap,
    stride_cb,
    stride_cn,
    stride_ck,
    stride_cp,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """BN tokens of one image: π = softmax_k(‖col_k‖ / τ) and w_k = π_k (a_k − col_k), one read of a and col."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)[:, None, None]
    k = tl.arange(0, BK)[None, :, None]
    q = tl.arange(0, BP)[None, None, :]
    mask = (n < N) & (k < K) & (q < p)
    a = tl.load(A_ptr + b * stride_ab + n * stride_an + k * stride_ak + q * stride_ap, mask=mask, other=0.0)
    c = tl.load(C_ptr + b * stride_cb + n * stride_cn + k * stride_ck + q * stride_cp, mask=mask, other=0.0)
    a = a.to(tl.float32)
    c = c.to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    logits = tl.sqrt(tl.sum(c * c, axis=2)) / tau  # (BN, BK)
    k2 = tl.arange(0, BK)[None, :]
    logits = tl.where(k2 < K, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    pi = e / tl.sum(e, axis=1)[:, None]
    w = pi[:, :, None] * (a - c)
    if ROUND_BF16:
        # The interpreter truncates fp32 -> bf16; the GPU rounds to nearest even. Pre-rounding the bits makes the
        # interpreter's truncation give the GPU's result.
        bits = w.to(tl.uint32, bitcast=True)
        w = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
    # w is (B, N, K, p) contiguous, π (B, N, K) contiguous.
    tl.store(W_ptr + ((b * N + n) * K + k) * p + q, w.to(W_ptr.dtype.element_ty), mask=mask)  # RNE on a GPU
    n2 = tl.program_id(1) * BN + tl.arange(0, BN)[:, None]
    tl.store(P_ptr + (b * N + n2) * K + k2, pi, mask=(n2 < N) & (k2 < K))


def compress_memberships(a: Tensor, col: Tensor, tau: Tensor, out: tuple[Tensor, Tensor] | None = None):
    """``(w (B, N, K, p) in a's dtype, π (B, N, K) float32)`` by the Triton kernel; see ``pace.kernels``."""
    B, N, K, p = a.shape
    if out is None:
        out = (
            torch.empty((B, N, K, p), device=a.device, dtype=a.dtype),
            torch.empty((B, N, K), device=a.device, dtype=torch.float32),
        )
    w, pi = out
    if w.numel() == 0:
        return w, pi
    BK, BP = triton.next_power_of_2(K), triton.next_power_of_2(p)
    BN = max(1, min(64, 4096 // (BK * BP)))
    _memberships_kernel[(B, triton.cdiv(N, BN))](
        a,
        col,
        tau,
        w,
        pi,
        N,
        K,
        p,
        *a.stride(),
        *col.stride(),
        BN=BN,
        BK=BK,
        BP=BP,
        ROUND_BF16=_INTERPRETED and w.dtype == torch.bfloat16,
        num_warps=4,
    )
    return w, pi
