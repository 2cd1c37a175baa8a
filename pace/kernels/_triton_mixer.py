"""Triton kernels of the fused PACE mixer (full Compress form): memberships forward and backward, the Expand basis
and the backward's prologue (``cast_dot``).

Imported lazily by ``pace.kernels._dispatch`` (importing it imports Triton). The membership kernels run one program
per (image, 16 tokens). The launchers assume what the custom ops in ``pace.kernels.mixer_ops`` check: contiguous
(B, N, ·) activations in bfloat16/float16/float32, float32 ``Q_c`` (B, K, p, r) and float32 scalars ``[τ, α, β]``.
``out`` arguments exist so that tests can hand in poisoned buffers and check that every element is written.
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
def _head_rows(X_ptr, b, k, n2, N, K, p, BP: tl.constexpr):
    """Head k's p columns of the program's tokens of a (B, N, K·p) activation, (BN, BP) in fp32."""
    jp = tl.arange(0, BP)[None, :]
    return tl.load(X_ptr + (b * N + n2) * (K * p) + k * p + jp, mask=(n2 < N) & (jp < p), other=0.0).to(tl.float32)


@triton.jit
def _head_basis(Q_ptr, b, k, K, r, p, BR: tl.constexpr, BP: tl.constexpr):
    """Head k's Compress basis Q_k of image b, (BP, BR) in fp32 (zero outside p × r)."""
    jp = tl.arange(0, BP)[:, None]
    jr = tl.arange(0, BR)[None, :]
    return tl.load(Q_ptr + ((b * K + k) * p + jp) * r + jr, mask=(jp < p) & (jr < r), other=0.0)


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
def _pick(t, k2, k):
    """Column k of the program's (BN, BK) per-head values, as (BN, 1)."""
    return tl.sum(tl.where(k2 == k, t, 0.0), axis=1)[:, None]


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
    A_ptr, Q_ptr, S_ptr,  # in: a (B, N, Kp), Q_c (B, K, p, r), [τ, α, β]
    Z_ptr, Pi_ptr, Sq_ptr,  # out: z like a, π and ‖col‖² (B, N, K)
    N, K, r, p,
    TINY_: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
    ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """c_k = a_kQ_k, col_k = c_kQ_kᵀ, π = softmax_k(‖col_k‖/τ), z_k = π_k(a_k − col_k) for BN tokens."""
    b, n2, k2, _, _, _, _, tau, _, _ = _program_indices(S_ptr, BN, BK, BR, BP)
    sq = tl.zeros((BN, BK), dtype=tl.float32)
    for k in range(K):
        q = _head_basis(Q_ptr, b, k, K, r, p, BR, BP)
        c = tl.dot(_head_rows(A_ptr, b, k, n2, N, K, p, BP), q, input_precision=PRECISION)
        col = tl.dot(c, tl.trans(q), input_precision=PRECISION)
        sq = tl.where(k2 == k, tl.sum(col * col, axis=1)[:, None], sq)
    pi = _softmax_store(Pi_ptr, Sq_ptr, sq, b, n2, k2, N, K, tau, TINY_)
    jp = tl.arange(0, BP)[None, :]
    for k in range(K):  # the products again: a second pass over a_k (in cache) instead of a (B, N, K·p) buffer
        q = _head_basis(Q_ptr, b, k, K, r, p, BR, BP)
        a = _head_rows(A_ptr, b, k, n2, N, K, p, BP)
        col = tl.dot(tl.dot(a, q, input_precision=PRECISION), tl.trans(q), input_precision=PRECISION)
        z = _rounded(_pick(pi, k2, k) * (a - col), ROUND_BF16)
        tl.store(Z_ptr + (b * N + n2) * (K * p) + k * p + jp, z.to(Z_ptr.dtype.element_ty), mask=(n2 < N) & (jp < p))


@triton.jit
def _store_partials(Part_ptr, b, alpha_part, beta_part, tau_part):
    """This program's partial sums of the α, β and τ gradients, in its row of the partials buffer."""
    row = (b * tl.num_programs(1) + tl.program_id(1)) * 3
    tl.store(Part_ptr + row, alpha_part)
    tl.store(Part_ptr + row + 1, beta_part)
    tl.store(Part_ptr + row + 2, tau_part)


@triton.jit
def _memberships_bwd_kernel(
    GQ_ptr, P_ptr, GU_ptr, A_ptr, Pi_ptr, Sq_ptr, Gpi_ptr, Q_ptr, S_ptr,  # in: gQ_e, x̂Q_e, gU, a, π, ‖col‖², ∂L/∂π
    Sqb_ptr, Part_ptr,  # out: ∂L/∂‖col‖² (B, N, K), (programs, 3) partial sums
    N, K, r, p,
    TINY_: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
    HAS_GPI: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """∂L/∂‖col‖² of BN tokens, through π (softmax over the heads, so every head's h_k first), and this program's
    partial sums of the α, β and τ gradients."""
    b, n2, k2, n3, k3, r3, _, tau, alpha, beta = _program_indices(S_ptr, BN, BK, BR, BP)
    pi, sq, g_pi = _load_memberships(Pi_ptr, Sq_ptr, Gpi_ptr, b, n2, k2, N, K, HAS_GPI)
    # α through the Expand term (c_e = K·r columns, read as K groups of r): −<gQ_e, x̂Q_e>.
    mask_r, off = _head_columns(b, n3, k3, r3, N, K, r, K * r)
    g_qe = tl.load(GQ_ptr + off, mask=mask_r, other=0.0).to(tl.float32)
    p_e = tl.load(P_ptr + off, mask=mask_r, other=0.0).to(tl.float32)
    alpha_part = -tl.sum(tl.sum(tl.sum(g_qe * p_e, axis=2), axis=1), axis=0)
    # ∂L/∂π_k through the update: h_k = <gU_kQ_k, c_k> − <gU_k, a_k>.
    h = tl.zeros((BN, BK), dtype=tl.float32)
    for k in range(K):
        q = _head_basis(Q_ptr, b, k, K, r, p, BR, BP)
        a = _head_rows(A_ptr, b, k, n2, N, K, p, BP)
        g_u = _head_rows(GU_ptr, b, k, n2, N, K, p, BP)
        c = tl.dot(a, q, input_precision=PRECISION)
        g_v = tl.dot(g_u, q, input_precision=PRECISION)
        h = tl.where(k2 == k, (tl.sum(g_v * c, axis=1) - tl.sum(g_u * a, axis=1))[:, None], h)
    beta_part, tau_part, sq_bar = _softmax_backward(pi, sq, h, g_pi, tau, beta, TINY_)
    tl.store(Sqb_ptr + (b * N + n2) * K + k2, sq_bar, mask=(n2 < N) & (k2 < K))
    _store_partials(Part_ptr, b, alpha_part, beta_part, tau_part)


@triton.jit
def _heads_bwd_kernel(
    A_ptr, GU_ptr, Pi_ptr, Sqb_ptr, Q_ptr, S_ptr,  # in: a, gU, π, ∂L/∂‖col‖², Q_c, [τ, α, β]
    Abar_ptr, Qbar_ptr,  # out: ā like a, Q̄_c (B, K, p, r) fp32
    N, K, r, p,
    BN: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Head k of image b, all its tokens, BN at a time: ā_k = W₁Q_kᵀ − βπ_k gU_k per token, and
    Q̄_k = Σ_n a_kᵀW₁ + col̄_kᵀc_k summed in registers, with W₁ = ∂L/∂c_k = βπ_k gU_kQ_k + 2∂‖col_k‖² c_kQ_kᵀQ_k and
    col̄_k = βπ_k gU_k + 2∂‖col_k‖² col_k (through z_k = π_k(a_k − col_k) and ‖col_k‖²)."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    beta = tl.load(S_ptr + 2)
    q = _head_basis(Q_ptr, b, k, K, r, p, BR, BP)
    m = tl.dot(tl.trans(q), q, input_precision=PRECISION)  # M_k = Q_kᵀQ_k, (BR, BR)
    jp = tl.arange(0, BP)[None, :]
    acc = tl.zeros((BP, BR), dtype=tl.float32)
    for n0 in range(0, N, BN):  # a fixed order over the tokens: the sum does not depend on the GPU
        n2 = n0 + tl.arange(0, BN)[:, None]
        a = _head_rows(A_ptr, b, k, n2, N, K, p, BP)
        g_u = _head_rows(GU_ptr, b, k, n2, N, K, p, BP)
        row = (b * N + n2) * K + k
        bpi = beta * tl.load(Pi_ptr + row, mask=n2 < N, other=0.0)
        sqb = tl.load(Sqb_ptr + row, mask=n2 < N, other=0.0)
        c = tl.dot(a, q, input_precision=PRECISION)
        w1 = bpi * tl.dot(g_u, q, input_precision=PRECISION) + 2 * sqb * tl.dot(c, m, input_precision=PRECISION)
        a_bar = _rounded(tl.dot(w1, tl.trans(q), input_precision=PRECISION) - bpi * g_u, ROUND_BF16)
        off_a = (b * N + n2) * (K * p) + k * p + jp
        tl.store(Abar_ptr + off_a, a_bar.to(Abar_ptr.dtype.element_ty), mask=(n2 < N) & (jp < p))
        col_bar = bpi * g_u + 2 * sqb * tl.dot(c, tl.trans(q), input_precision=PRECISION)
        acc += tl.dot(tl.trans(a), w1, input_precision=PRECISION)
        acc += tl.dot(tl.trans(col_bar), c, input_precision=PRECISION)
    jq = tl.arange(0, BP)[:, None]
    jr = tl.arange(0, BR)[None, :]
    tl.store(Qbar_ptr + ((b * K + k) * p + jq) * r + jr, acc, mask=(jq < p) & (jr < r))


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
def _expand_basis_kernel(
    Y_ptr, F_ptr, Q_ptr, d, c, stride_yb, stride_ym, stride_yc,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Tile (m, n) of Q_e = Y F_s for one image: ``Σ_j Y[m, j] F_s[j, n]``, fp32-accurate, one rounding to Q's dtype."""
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, c, BK):
        k = k0 + kk
        y = tl.load(
            Y_ptr + b * stride_yb + m[:, None] * stride_ym + k[None, :] * stride_yc,
            mask=(m[:, None] < d) & (k[None, :] < c),
            other=0.0,
        ).to(tl.float32)  # a bf16 Y converts exactly
        f = tl.load(F_ptr + (b * c + k[:, None]) * c + n[None, :], mask=(k[:, None] < c) & (n[None, :] < c), other=0.0)
        acc += tl.dot(y, f, input_precision=PRECISION)
    out = _rounded(acc, ROUND_BF16).to(Q_ptr.dtype.element_ty)
    tl.store(Q_ptr + (b * d + m[:, None]) * c + n[None, :], out, mask=(m[:, None] < d) & (n[None, :] < c))


PROBE_KERNEL = _memberships_fwd_kernel  # how pace.kernels._dispatch tells compiled from interpreted
# The products with the fp32 bases (expand_basis' and the memberships' c_k = a_kQ_k, col_k = c_kQ_kᵀ and their
# backward): three TF32 tensor-core products per tile (hi·hi + hi·lo + lo·hi), fp32-accurate to about 1e-6
# relative, where "ieee" (fp32 FMA, no tensor cores) would make these small products compute-bound.
PRECISION = "tf32x3"


def _blocks(K: int, r: int, p: int) -> dict:
    return {
        "TINY_": TINY,
        "BN": BLOCK_TOKENS,
        "BK": triton.next_power_of_2(K),
        "BR": max(16, triton.next_power_of_2(r)),  # tl.dot's dimensions: at least 16
        "BP": max(16, triton.next_power_of_2(p)),
        "PRECISION": PRECISION,
    }


def mixer_memberships(a: Tensor, Q_c: Tensor, scalars: Tensor, out: tuple | None = None) -> tuple:
    """``(z, π, ‖col‖²)`` by the Triton kernel; see ``pace.kernels.mixer_memberships``."""
    B, N, _ = a.shape
    K, p, r = Q_c.shape[1:]
    if out is None:
        # (separate buffers: a custom op's outputs may not alias one another)
        out = (torch.empty_like(a), *(torch.empty((B, N, K), device=a.device, dtype=torch.float32) for _ in range(2)))
    z, pi, sq = out
    if B * N == 0:
        return out
    _memberships_fwd_kernel[(B, triton.cdiv(N, BLOCK_TOKENS))](
        a, Q_c, scalars, z, pi, sq, N, K, r, p,
        **_blocks(K, r, p), ROUND_BF16=_INTERPRETED and a.dtype == torch.bfloat16, num_warps=4,
    )  # fmt: skip
    return out


def mixer_memberships_backward(
    g_Qe: Tensor, P: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, Q_c: Tensor,
    scalars: Tensor, out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(∂L/∂‖col‖², [α, β, τ partial sums])`` by the Triton kernel; see ``pace.kernels``."""
    B, N, _ = P.shape
    K, p, r = Q_c.shape[1:]
    programs = triton.cdiv(N, BLOCK_TOKENS)
    sq_bar = torch.empty((B, N, K), device=P.device, dtype=torch.float32) if out is None else out
    partials = torch.zeros((B * programs, 3), device=P.device, dtype=torch.float32)
    if B * N > 0:
        blocks = _blocks(K, r, p)
        _memberships_bwd_kernel[(B, programs)](
            g_Qe, P, g_U, a, pi, sq, pi if g_pi is None else g_pi, Q_c, scalars, sq_bar, partials, N, K, r, p,
            **blocks, HAS_GPI=g_pi is not None, num_warps=4,
        )  # fmt: skip
    return sq_bar, partials.sum(0)


def mixer_heads_backward(
    a: Tensor, g_U: Tensor, pi: Tensor, sq_bar: Tensor, Q_c: Tensor, scalars: Tensor, out: tuple | None = None
) -> tuple[Tensor, Tensor]:
    """``(ā, Q̄_c)`` by the Triton kernel (one program per image and head); see ``pace.kernels``."""
    B, N, _ = a.shape
    K, p, r = Q_c.shape[1:]
    if out is None:
        out = (torch.empty_like(a), torch.empty((B, K, p, r), device=a.device, dtype=torch.float32))
    a_bar, Qc_bar = out
    if B * K > 0:
        blocks = _blocks(K, r, p)
        _heads_bwd_kernel[(B, K)](
            a, g_U, pi, sq_bar, Q_c, scalars, a_bar, Qc_bar, N, K, r, p,
            BN=blocks["BN"], BR=blocks["BR"], BP=blocks["BP"], ROUND_BF16=_INTERPRETED and a.dtype == torch.bfloat16,
            PRECISION=PRECISION, num_warps=4,
        )  # fmt: skip
    return out


CAST_DOT_BLOCK = 4096


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


def expand_basis(Y: Tensor, F_s: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``Q_e = Y F_s`` in ``dtype`` by the Triton kernel; see ``pace.kernels.expand_basis``.

    Y may have any strides; F_s must be contiguous.
    """
    B, d, c = Y.shape
    Q = torch.empty((B, d, c), device=Y.device, dtype=dtype) if out is None else out
    if Q.numel() == 0:
        return Q
    BM, BN, BK = 32, 32, 32
    _expand_basis_kernel[(B, triton.cdiv(d, BM), triton.cdiv(c, BN))](
        Y, F_s, Q, d, c, *Y.stride(),
        BM=BM, BN=BN, BK=BK, ROUND_BF16=_INTERPRETED and dtype == torch.bfloat16, PRECISION=PRECISION, num_warps=4,
    )  # fmt: skip
    return Q
