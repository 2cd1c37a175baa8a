"""The fused mixer's diag-form memberships as torch custom ops, forward and backward.

Diag form: ``keep_k = diag(Q_kQ_kᵀ)``, ``‖col_k‖² = Σ_p keep_k² a_k²``, ``π = softmax_k(max(‖col_k‖², tiny)^½ / τ)``
and GEMM 2's left factor ``z = π ⊙ (1 − keep) ⊙ a``. ``diag_memberships`` returns these with the product-dtype copy
of ``a`` (which the backward and no GEMM reads) from one read of the working-precision ``a``;
``diag_memberships_backward`` returns ``ā``, ``∂L/∂keep`` and the α, β, τ partial sums from one read of each
input. Backend per call as in ``pace.kernels._dispatch`` (kernels in ``_triton_diag.py``).
"""

import torch
from torch import Tensor

from pace.kernels import _dispatch
from pace.kernels.mixer_ops import _tiny, membership_backward


def block_diag(blocks: Tensor) -> Tensor:
    """Block-diagonal matrices (B, K·m, K·n) from per-head blocks (B, K, m, n): all heads in one product."""
    B, K, m, n = blocks.shape
    eye = torch.eye(K, device=blocks.device, dtype=blocks.dtype).view(1, K, K, 1, 1)
    return (blocks.unsqueeze(2) * eye).transpose(2, 3).reshape(B, K * m, K * n)  # (B, K, m, K, n) → (B, K·m, K·n)


def _per_head_sum(weights: Tensor, rows: Tensor) -> Tensor:
    """``Σ_n weights[b, n, k] · rows[b, n, k, :]``: (B, N, K), (B, N, K·p) → (B, K, p), from one product."""
    B, K = weights.shape[0], weights.shape[2]
    full = (weights.mT @ rows).view(B, K, K, -1)  # (B, K, K, p): head j's weights against head k's columns
    return full.diagonal(dim1=1, dim2=2).mT  # (B, p, K) → (B, K, p)


def diag_memberships_reference(
    a_w: Tensor, keep: Tensor, scalars: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch ``(a, z, π, ‖col‖²)`` of the diag form; ‖col‖² and π in a_w's dtype, z from the rounded a.

    Args:
        a_w: ``x̂U`` in the working precision (float32, float64 for float64 input), shape (B, N, K·p).
        keep: ``diag(Q_kQ_kᵀ)``, shape (B, K, p), a_w's dtype.
        scalars: ``[τ, α, β]`` in a_w's dtype.
        dtype: The matrix-product dtype of ``a`` and ``z``.

    Returns:
        ``a`` (a_w in ``dtype``, a new tensor), ``z = π ⊙ (1 − keep) ⊙ a`` in ``dtype``, π and ``‖col‖²``
        (B, N, K) in a_w's dtype.
    """
    B, N, d = a_w.shape
    K, p = keep.shape[1], keep.shape[2]
    tau = scalars[0]
    sq = a_w.square() @ block_diag(keep.square().unsqueeze(-1))  # Σ_p keep² a², (B, N, K)
    root = sq.clamp_min(_tiny(sq.dtype)).sqrt()  # the clamp keeps the square root's gradient finite
    pi = torch.softmax(root / tau, dim=-1)
    a = a_w.to(dtype, copy=True)
    z = a.view(B, N, K, p) * (pi.unsqueeze(-1) * (1 - keep).unsqueeze(1)).to(dtype)  # π ⊙ null
    return a, z.view(B, N, d), pi, sq


def diag_memberships_backward_reference(
    g_Qe: Tensor, P_e: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, keep: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """PyTorch backward of :func:`diag_memberships_reference` (z entering GEMM 2 as ``−β zUᵀ``, π an output).

    Args:
        g_Qe: ``gQ_e``, shape (B, N, c_e) (g: the update's cotangent).
        P_e: ``x̂Q_e``, shape (B, N, c_e).
        g_U: ``gU``, shape (B, N, K·p).
        a: ``x̂U`` in the product dtype, shape (B, N, K·p).
        pi, sq, g_pi, scalars: As for :func:`pace.kernels.mixer_ops.mixer_memberships_backward_reference`.
        keep: As in the forward.

    Returns:
        ``ā`` (through z and ‖col‖²) in a's dtype, ``∂L/∂keep`` (B, K, p) in keep's dtype (through z and ‖col‖²)
        and the partial scalar gradients ``[−<gQ_e, x̂Q_e>, ∂L/∂β, ∂L/∂τ]`` in keep's dtype.
    """
    B, N, d = a.shape
    K, p = keep.shape[1], keep.shape[2]
    md, wd = a.dtype, keep.dtype
    tau, _, beta = scalars.unbind()
    alpha_part = -(g_Qe * P_e).sum(dtype=wd)
    a4, gU4 = a.view(B, N, K, p), g_U.view(B, N, K, p)
    a_w = a.to(wd)
    u = g_U.to(wd) * a_w
    h = -(u @ block_diag((1 - keep).unsqueeze(-1)))  # −Σ_p gU a (1 − keep), (B, N, K)
    beta_part, tau_part, sq_bar = membership_backward(h, pi, sq, g_pi, tau, beta)
    neg_beta_pi = (-beta * pi).unsqueeze(-1)  # (B, N, K, 1)
    a_bar = gU4 * (neg_beta_pi * (1 - keep).unsqueeze(1)).to(md)
    a_bar.addcmul_(a4, (2 * sq_bar.unsqueeze(-1) * keep.square().unsqueeze(1)).to(md))
    # keep enters z (through 1 − keep) and ‖col‖² = Σ keep² a²: Σ_n per head.
    keep_bar = beta * _per_head_sum(pi, u) + 2 * keep * _per_head_sum(sq_bar, a_w.square())
    return a_bar.view(B, N, d), keep_bar, torch.stack([alpha_part, beta_part, tau_part])


def _triton(a: Tensor, keep: Tensor):
    supported = a.dtype in (torch.float32, torch.bfloat16, torch.float16) and keep.dtype == torch.float32
    return _dispatch.triton_module(a, "_triton_diag") if supported else None


@torch.library.custom_op("pace::diag_memberships", mutates_args=())
def _diag_memberships_op(
    a_w: Tensor, keep: Tensor, scalars: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    module = _triton(a_w, keep) if a_w.dtype == torch.float32 and dtype in (torch.float32, torch.bfloat16) else None
    if module is None:
        return tuple(t.contiguous() for t in diag_memberships_reference(a_w, keep, scalars, dtype))
    return module.diag_memberships(a_w.contiguous(), keep.contiguous(), scalars.contiguous(), dtype)


@_diag_memberships_op.register_fake
def _(a_w: Tensor, keep: Tensor, scalars: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N, _ = a_w.shape
    K = keep.shape[1]
    copy = a_w.new_empty(a_w.shape, dtype=dtype)
    return copy, torch.empty_like(copy), a_w.new_empty((B, N, K)), a_w.new_empty((B, N, K))


@torch.library.custom_op("pace::diag_memberships_backward", mutates_args=())
def _diag_memberships_backward_op(
    g_Qe: Tensor, P_e: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, keep: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    args = (g_Qe, P_e, g_U, a, pi, sq, g_pi, keep, scalars)
    module = _triton(a, keep)
    if module is None:
        return tuple(t.contiguous() for t in diag_memberships_backward_reference(*args))
    return module.diag_memberships_backward(*(None if t is None else t.contiguous() for t in args))


@_diag_memberships_backward_op.register_fake
def _(g_Qe, P_e, g_U, a, pi, sq, g_pi, keep, scalars) -> tuple[Tensor, Tensor, Tensor]:
    return a.new_empty(a.shape), keep.new_empty(keep.shape), keep.new_empty((3,))


def _check(a: Tensor, keep: Tensor, scalars: Tensor, name: str) -> None:
    ok = a.dim() == 3 and keep.dim() == 3 and scalars.shape == (3,)
    if ok:
        ok = keep.shape[0] == a.shape[0] and keep.shape[1] * keep.shape[2] == a.shape[2]
    if not ok:
        raise ValueError(
            f"{name}: a (B, N, K·p), keep (B, K, p) and scalars (3,) expected, got "
            f"{tuple(a.shape)}, {tuple(keep.shape)}, {tuple(scalars.shape)}"
        )


def diag_memberships(
    a_w: Tensor, keep: Tensor, scalars: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The diag form's memberships and GEMM 2's factor z (custom op ``pace::diag_memberships``).

    The Triton kernel (CUDA, or the interpreter when forced; float32 a_w and keep, float32/bfloat16 ``dtype``)
    reads a_w once and writes a, z, π and ‖col‖²; ‖col‖² and π in fp32 from the unrounded a_w (with a rounded
    to bf16 first, the τ gradient's error was 2e-2 of its scale), z with one rounding. The fallback is
    :func:`diag_memberships_reference`.

    Args:
        a_w: ``x̂U`` in the working precision, shape (B, N, K·p).
        keep: ``diag(Q_kQ_kᵀ)``, shape (B, K, p).
        scalars: ``[τ, α, β]``.
        dtype: The dtype of the copies ``a`` and ``z``.

    Returns:
        ``(a, z, π, ‖col‖²)`` as :func:`diag_memberships_reference`, contiguous.
    """
    _check(a_w, keep, scalars, "diag_memberships")
    return _diag_memberships_op(a_w, keep, scalars, dtype)


def diag_memberships_backward(
    g_Qe: Tensor, P_e: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, keep: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward of :func:`diag_memberships` (custom op ``pace::diag_memberships_backward``).

    Arguments and results as :func:`diag_memberships_backward_reference`; the Triton kernel reads each input once
    and writes ā once (fp32 arithmetic, one rounding); ∂L/∂keep and the scalar partial sums per program, added up
    in fp32. ``g_pi`` may be None (π unused by the loss: a zero cotangent that is never written).
    """
    _check(a, keep, scalars, "diag_memberships_backward")
    per_head = a.shape[:2] + keep.shape[1:2]
    g_pi_shape = per_head if g_pi is None else g_pi.shape
    ok = g_Qe.shape == P_e.shape and g_Qe.shape[:2] == a.shape[:2] and g_U.shape == a.shape
    if not ok or not pi.shape == sq.shape == g_pi_shape == per_head:
        raise ValueError("diag_memberships_backward: cotangent or saved shapes do not match the forward's")
    return _diag_memberships_backward_op(g_Qe, P_e, g_U, a, pi, sq, g_pi, keep, scalars)
