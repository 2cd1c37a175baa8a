"""Compress memberships and weights as one torch custom op: π = softmax_k(‖col_k‖/τ), w_k = π_k (a_k − col_k)."""

import torch
from torch import Tensor

from pace.kernels import _dispatch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def compress_memberships_reference(a: Tensor, col: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch memberships and weights, computed in (at least) float32 and rounded once.

    Args:
        a: Head coordinates ``a_k = U_kᵀx``, shape (B, N, K, p), any strides.
        col: Their parts inside the sketched spaces, same shape.
        tau: Temperature τ, a 0-dim tensor.

    Returns:
        ``w`` (B, N, K, p) in a's dtype and ``π`` (B, N, K) in float32 (float64 for float64 input).
    """
    acc = _acc_dtype(col.dtype)
    norms = torch.linalg.vector_norm(col, dim=-1, dtype=acc)  # (B, N, K)
    pi = torch.softmax(norms / tau.to(acc), dim=-1)
    w = (a.to(acc) - col.to(acc)) * pi.unsqueeze(-1)
    return w.to(a.dtype), pi


@torch.library.custom_op("pace::compress_memberships", mutates_args=())
def _compress_memberships_op(a: Tensor, col: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    supported = a.dtype in (torch.float32, torch.bfloat16, torch.float16) and col.dtype in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )
    module = _dispatch.triton_module(a) if supported else None
    if module is None:
        w, pi = compress_memberships_reference(a, col, tau)
        return w.contiguous(), pi.contiguous()
    return module.compress_memberships(a, col, tau.reshape(()))


@_compress_memberships_op.register_fake
def _(a: Tensor, col: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    B, N, K, p = a.shape
    return a.new_empty((B, N, K, p)), a.new_empty((B, N, K), dtype=_acc_dtype(col.dtype))


def _setup(ctx, inputs, output) -> None:
    a, col, tau = inputs
    ctx.save_for_backward(a, col, tau, output[1])


def _backward(ctx, w_bar: Tensor | None, pi_bar: Tensor | None) -> tuple[Tensor | None, ...]:
    # With null = a − col: ā = π w̄; π̄ += ⟨w̄_k, null_k⟩; logits ḡ = π (π̄ − Σ_k π π̄) (softmax); ‖col‖ gets ḡ/τ,
    # so c̄ol = −ā + (ḡ/τ) col/‖col‖ (0 where col = 0, as vector_norm's backward); τ̄ = −Σ ḡ ‖col‖ / τ².
    a, col, tau, pi = ctx.saved_tensors
    acc = pi.dtype
    col32 = col.to(acc)
    norms = torch.linalg.vector_norm(col32, dim=-1)  # (B, N, K)
    total = torch.zeros_like(pi) if pi_bar is None else pi_bar.to(acc)
    grad_a = None
    if w_bar is not None:
        w_bar32 = w_bar.to(acc)
        total = total + (w_bar32 * (a.to(acc) - col32)).sum(-1)
        grad_a = pi.unsqueeze(-1) * w_bar32
    g = pi * (total - (pi * total).sum(-1, keepdim=True))
    tau32 = tau.to(acc)
    unit = col32 / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
    grad_col = (g / tau32).unsqueeze(-1) * unit
    if grad_a is not None:
        grad_col = grad_col - grad_a
    grad_tau = (-(g * norms).sum() / tau32.square()).reshape(tau.shape).to(tau.dtype)
    return (
        None if grad_a is None else grad_a.to(a.dtype),
        grad_col.to(col.dtype),
        grad_tau,
    )


_compress_memberships_op.register_autograd(_backward, setup_context=_setup)


def compress_memberships(a: Tensor, col: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """Memberships ``π = softmax_k(‖col_k‖ / τ)`` and weights ``w_k = π_k (a_k − col_k)`` (custom op ``pace::…``).

    One read of ``a`` and ``col`` and one write of ``w`` in the Triton kernel (CUDA, or the interpreter when
    forced), instead of today's norm, softmax, subtraction, product and head-to-token transpose. Inputs may be
    any strided (B, N, K, p) views, e.g. head-major ``a_h.view(B, K, N, p).transpose(1, 2)``; ``w`` comes back
    token-major and contiguous, so ``w.view(B, N, K·p)`` is free. The arithmetic is in float32 with one rounding
    of ``w`` (``pace.layers.compress`` rounds ``a − col`` and ``π`` to the activation dtype first). Differentiable
    in ``a``, ``col`` and ``τ`` (backward in PyTorch).

    Args:
        a: Head coordinates ``a_k = U_kᵀx``, shape (B, N, K, p); float32, bfloat16 or float16 for Triton.
        col: Their parts in the sketched spaces, same shape.
        tau: Temperature τ, a 0-dim tensor.

    Returns:
        ``w`` (B, N, K, p) in a's dtype, contiguous, and ``π`` (B, N, K) in float32 (float64 for float64 input).
    """
    if a.dim() != 4 or a.shape != col.shape or tau.numel() != 1:
        raise ValueError(
            f"compress_memberships: a and col must share a (B, N, K, p) shape and tau be a scalar, got "
            f"{tuple(a.shape)}, {tuple(col.shape)}, {tuple(tau.shape)}"
        )
    return _compress_memberships_op(a, col, tau)
