"""Orthonormal-ish basis of a sketched column space: the ridge-regularised Cholesky step of PACEAttention."""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from pace import kernels

PROJECTORS = ("ridge", "exact")
_RIDGE_TILE = 32  # the largest c whose ridge backward chain pace.kernels runs in one register tile


def validate_projector(projector: str) -> bool:
    """Check a projector name and return whether it is the exact one.

    Args:
        projector: ``"ridge"`` (the soft projector of the reference) or ``"exact"`` (an orthogonal projector).

    Returns:
        True for ``"exact"``, False for ``"ridge"``.
    """
    if projector not in PROJECTORS:
        raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
    return projector == "exact"


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    # The meta device (shape-only runs) has no autocast backend.
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type=device_type, enabled=False)


def inverse_cholesky_factor(G: Tensor) -> Tensor:
    """Upper-triangular ``F = L⁻ᵀ`` of SPD matrices ``G = L Lᵀ``, so that ``F Fᵀ = G⁻¹``; batched, pure PyTorch.

    With the small explicit factor, ``Q = Ŷ F`` is one matrix product and the backward's ``H L⁻¹`` is ``H Fᵀ``: no
    triangular solve against a tall (…, m, c) right-hand side anywhere. The only solve is against the c × c
    identity. ``G`` is never checked for definiteness (no host sync): the ridge step adds ``εI`` first.

    Args:
        G: SPD matrices, shape (B, c, c), float32 or float64.

    Returns:
        ``F`` of shape (B, c, c), upper triangular, in the dtype of ``G``.
    """
    if G.is_cuda:
        # The Triton kernel of pace.kernels (one program per matrix, no cuSOLVER launches) where Triton runs; the
        # op falls back to the lines below by itself otherwise. On the CPU those lines run directly.
        return kernels.inverse_cholesky_factor(G).to(G.dtype)
    L = torch.linalg.cholesky_ex(G).L
    eye = torch.eye(G.shape[-1], device=G.device, dtype=G.dtype)
    return torch.linalg.solve_triangular(L, eye, upper=False).mT  # (L⁻¹)ᵀ


def _ridge_factors(Y: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(Ŷ, column norms clamped at 1e-12, F, Q)`` of the ridge step for sketches Y (B, m, c), in Y's dtype."""
    scale = torch.linalg.vector_norm(Y, dim=-2, keepdim=True).clamp_min(1e-12)  # (B, 1, c), as F.normalize
    Y_hat = Y / scale  # (B, m, c), unit columns
    G = torch.baddbmm(torch.eye(Y.shape[-1], device=Y.device, dtype=Y.dtype), Y_hat.mT, Y_hat, alpha=1.0, beta=eps)
    F_up = inverse_cholesky_factor(G)  # (B, c, c), F Fᵀ = G⁻¹
    return Y_hat, scale, F_up, Y_hat @ F_up  # Q = Ŷ L⁻ᵀ


def scaled_ridge_factors(Y: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(column scales, G, D⁻¹F)`` of the ridge step, without writing the normalised sketches ``Ŷ``.

    ``Ŷ = Y D⁻¹`` with ``D = diag(scale)``, so ``G = ŶᵀŶ + εI = D⁻¹(YᵀY)D⁻¹ + εI`` comes from one pass over ``Y``
    (:func:`pace.kernels.normalized_gram`: the Triton kernel where it runs) and ``Q = Ŷ F = Y (D⁻¹F)``: the scales
    go into the small factor's rows: the basis is the product ``Y @ F_s``. Same values as :func:`_ridge_factors`
    up to rounding.

    Args:
        Y: Sketches, shape (B, m, c), float32 or float64, or bfloat16/float16 (read as they are).
        eps: Ridge ε.

    Returns:
        ``scale`` (B, 1, c) (column norms clamped at 1e-12), ``G`` (B, c, c) and ``F_s = D⁻¹F`` (B, c, c), in Y's
        dtype (float32 for a narrower Y).
    """
    scale, G = kernels.normalized_gram(Y, eps)
    return scale, G, kernels.inverse_cholesky_factor(G, row_scale=scale.squeeze(-2)).to(G.dtype)  # D⁻¹F, FFᵀ = G⁻¹


def ridge_factors_backward(
    Y: Tensor, scale: Tensor, G: Tensor, F_s: Tensor, eps: float, Q_bar: Tensor, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Gradient with respect to the sketches ``Y`` of the ridge basis ``Q = Ŷ F = Y F_s``, given ``∂L/∂Q``.

    Valid whenever the loss depends on ``F`` only through ``F Fᵀ = G⁻¹`` (every use of the basis here goes through
    ``Q Qᵀ``): then ``∂L/∂G = −½ F sym(Fᵀ F̄) Fᵀ`` with ``F̄ = Ŷᵀ Q̄``, and ``G = ŶᵀŶ + εI`` adds ``2 Ŷ ∂L/∂G`` to
    ``H = ∂L/∂Ŷ = Q̄ Fᵀ``; then the column normalisation's backward ``∂L/∂Y = (H − Ŷ diag(ρ)) D⁻¹`` with the
    radial part ``ρ = diag(ŶᵀH)`` (0 where the norm was clamped). With ``Ŷ = Y D⁻¹``, ``F_s = D⁻¹F``,
    ``W = YᵀQ̄`` and ``A = F_sᵀW = Fᵀ F̄``, everything but two products is on c × c matrices:
    ``∂L/∂Y = Q̄ F_sᵀ − ½ Y (G_s + 2 diag(ρ / s²))`` with ``G_s = F_s(A + Aᵀ)F_sᵀ`` and
    ``ρ_j = Σ_k W_jk F_s,jk − ½ s_j Σ_k (G − εI)_jk s_k G_s,jk``. ``Ŷ`` and ``H`` are never written.

    Args:
        Y: Sketches, shape (B, m, c), in F_s's dtype or narrower.
        scale: Their column norms ``s`` clamped at 1e-12, shape (B, 1, c).
        G: ``ŶᵀŶ + εI``, shape (B, c, c).
        F_s: ``D⁻¹F`` from :func:`scaled_ridge_factors`, shape (B, c, c).
        eps: The ε inside ``G``.
        Q_bar: ``∂L/∂Q``, shape (B, m, c).
        out_dtype: The result's dtype if not F_s's (a narrower one, rounded to as it is written).

    Returns:
        ``∂L/∂Y``, shape (B, m, c), accumulated in F_s's dtype.
    """
    W = kernels.matmul_sum(None, [Y.mT], [Q_bar], dtype=F_s.dtype)  # (B, c, c); Y and Q̄ may be narrower
    # −½Γ, Γ = G_s + 2 diag(ρ/s²): one register-tile Triton program per matrix where c fits (the Compress ridge);
    # above, G_s's products in ATen and the radial term in one row kernel. The kernels write −½Γ, so that the two
    # tall products of the result are one kernel with no coefficient: ∂L/∂Y = Q̄F_sᵀ + Y(−½Γ).
    if Y.shape[-1] <= _RIDGE_TILE:
        Gamma = kernels.ridge_gradient_matrix(W, F_s, G, scale, eps, coef=-0.5)
    else:
        H = kernels.symmetric_gradient(W, F_s, half=True)  # G_s = H + Hᵀ, summed in the radial kernel
        Gamma = kernels.ridge_radial_diagonal(W, F_s, G, H, scale, eps, coef=-0.5, half=True)
    return kernels.matmul_sum(None, [Q_bar, Y], [F_s.mT, Gamma], dtype=F_s.dtype, out_dtype=out_dtype)


def _normalisation_backward(Y_hat: Tensor, norms: Tensor, H: Tensor) -> Tensor:
    # Backward of Ŷ = Y / max(‖y‖, 1e-12): the radial part is removed where the norm was not clamped.
    radial = (Y_hat * H).sum(-2, keepdim=True) * (norms > 1e-12)
    return H.sub_(Y_hat * radial).div_(norms)


def ridge_basis(Y: Tensor, *, eps: float, exact: bool = False) -> Tensor:
    """Basis ``Q`` of the column space of each sketch ``Y``, batched, computed in (at least) float32.

    Ridge mode (the reference's step): the columns of ``Y`` are scaled to unit norm (``Ŷ``), then
    ``G = ŶᵀŶ + εI = L Lᵀ`` and ``Q = Ŷ L⁻ᵀ``, a product with the explicit small factor ``L⁻ᵀ``
    (:func:`inverse_cholesky_factor`). ``QQᵀ = Ŷ (ŶᵀŶ + εI)⁻¹ Ŷᵀ`` is a soft
    projector onto range(Y) whose eigenvalues are ``λ/(λ+ε)`` for the eigenvalues ``λ`` of ``ŶᵀŶ``. Because
    ``G ⪰ εI`` the Cholesky factorisation exists for every input, so its status is not checked (no host sync).

    Exact mode: a Householder QR of ``Ŷ``; ``Q`` has orthonormal columns and, when ``rank(Y) = c``, ``QQᵀ`` is the
    orthogonal projector onto range(Y). When ``rank(Y) < c`` (for instance fewer tokens than sketch columns),
    ``Q`` still has ``c`` orthonormal columns whose span contains range(Y) plus ``c - rank(Y)`` directions set by
    rounding, so ``QQᵀ`` projects onto a larger subspace, and the gradient through the QR, which divides by the
    diagonal of ``R``, is unbounded. Use ridge mode whenever ``Y`` can lose rank.

    Args:
        Y: Sketches, shape (B, m, c) with ``c <= m``; any floating dtype.
        eps: Ridge ε added to the Gram matrix (ridge mode only; must be positive).
        exact: Return an orthonormal basis instead of the ridge-regularised one.

    Returns:
        ``Q`` of shape (B, m, c) in float32 (float64 if ``Y`` is float64); callers cast it back.
    """
    work_dtype = torch.promote_types(Y.dtype, torch.float32)
    # Autocast would run the Gram product in bf16/fp16, and the Cholesky needs it in full precision.
    with _no_autocast(Y.device.type):
        if exact:
            return torch.linalg.qr(F.normalize(Y.to(work_dtype), dim=-2), mode="reduced").Q
        return _ridge_factors(Y.to(work_dtype), eps)[3]


def _matmul_dtype(x: Tensor) -> torch.dtype:
    # The dtype autocast would give a matrix product of x: its lower precision for float32 input, else x's own.
    device_type = x.device.type
    if device_type != "meta" and x.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def wide_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` from operands rounded as autocast would round them, with the result in (at least) float32.

    Under bf16 autocast a product's result is rounded to bf16 too; where a small difference of such results is
    taken later (a projection's complement, a norm that feeds a softmax and the τ gradient), that rounding dominates
    the error. Products of bf16 values are exact in float32 (and in TF32, which tensor cores run where the caller
    allows it), so this costs a float32 product, not accuracy. Without autocast it is ``a @ b``.

    Args:
        a: Left operand, any floating dtype.
        b: Right operand, broadcastable as in ``torch.matmul``.

    Returns:
        The product in ``promote_types(a.dtype, float32)``.
    """
    md = _matmul_dtype(a)
    wd = torch.promote_types(a.dtype, torch.float32)
    with _no_autocast(a.device.type):
        return a.to(md).to(wd) @ b.to(md).to(wd)


class _RidgeProject(torch.autograd.Function):
    """``s·xΠ`` or ``s·(x − xΠ)`` with the ridge projector ``Π = QQᵀ = Ŷ (ŶᵀŶ + εI)⁻¹ Ŷᵀ`` of ``Y = xᵀΩ``.

    Autograd through the Cholesky factorisation, the triangular solve and the products costs several
    factorisation-sized steps, full-size temporaries and gradient accumulations; this backward uses the closed
    form instead. With ``A = ∂L/∂Π = xᵀg`` (negated for the complement) and the product rule on
    ``Π = Ŷ G⁻¹ Ŷᵀ`` (``W = Ŷ G⁻¹ = Q L⁻¹``): ``∂L/∂Ŷ = (I − Π)(A + Aᵀ) W = (I − QQᵀ)(xᵀ(gQ) + gᵀ(xQ)) L⁻¹``, then
    the backward of the column normalisation gives ``∂L/∂Y``, and ``∂L/∂x = gΠ + Ω(∂L/∂Y)ᵀ`` (``g − gΠ + …`` for
    the complement), accumulated in place. The optional scalar ``s`` is folded into the small matrix ``Q`` and one
    pass over ``x``; its gradient is a dot product.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sketch: Tensor, scale: Tensor | None, eps: float, complement: bool) -> Tensor:
        mm_dtype = _matmul_dtype(x)
        with _no_autocast(x.device.type):
            x_mm, sketch_mm = x.to(mm_dtype), sketch.to(mm_dtype)
            Y = x_mm.mT @ sketch_mm  # (B, m, c)
            Y_hat, norms, F_up, Q = _ridge_factors(Y.to(torch.promote_types(Y.dtype, torch.float32)), eps)
            Q_mm = Q.to(mm_dtype)
            P = x_mm @ Q_mm  # (B, N, c)
            right = Q_mm if scale is None else Q_mm * scale.to(mm_dtype)  # (B, m, c)
            # The last product accumulates in x's dtype: its low-precision operands are exact there, and rounding
            # xΠ to bf16 would dominate the error of x − xΠ (see wide_matmul).
            P_x, right_x = P.to(x.dtype), right.to(x.dtype)
            if not complement:
                out = P_x @ right_x.mT
            elif scale is None:
                out = torch.baddbmm(x, P_x, right_x.mT, alpha=-1.0)
            else:
                out = torch.baddbmm(x * scale.to(x.dtype), P_x, right_x.mT, alpha=-1.0)
        ctx.save_for_backward(x_mm, sketch_mm, P, Y_hat, norms, F_up, Q, scale)
        ctx.complement = complement
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        x_mm, sketch_mm, P, Y_hat, norms, F_up, Q, scale = ctx.saved_tensors
        mm_dtype = P.dtype
        need_x, need_scale = ctx.needs_input_grad[0], scale is not None and ctx.needs_input_grad[2]
        grad_x = grad_scale = None
        with _no_autocast(g.device.type):
            Q_mm = Q.to(mm_dtype)
            gQ = g.to(mm_dtype) @ Q_mm  # (B, N, c)
            if need_scale:
                # <g, xΠ> = <gQ, xQ>; the complement adds <g, x>.
                acc = torch.promote_types(g.dtype, torch.float32)
                grad_scale = torch.dot(gQ.reshape(-1).to(acc), P.reshape(-1).to(acc))
                if ctx.complement:
                    grad_scale = torch.dot(g.reshape(-1).to(acc), x_mm.reshape(-1).to(acc)) - grad_scale
                grad_scale = grad_scale.to(scale.dtype)
            if not need_x:
                return None, None, grad_scale, None, None
            if scale is not None:
                g, gQ = g * scale.to(g.dtype), gQ * scale.to(mm_dtype)
            g_mm = g.to(mm_dtype)
            # ∂L/∂Ŷ = (I − QQᵀ) M L⁻¹ with M = ±(xᵀ(gQ) + gᵀP)
            M = torch.bmm(x_mm.mT, gQ).baddbmm_(g_mm.mT, P).to(Q.dtype)  # (B, m, c)
            if ctx.complement:
                M = M.neg_()
            H = torch.baddbmm(M, Q, Q.mT @ M, alpha=-1.0) @ F_up.mT  # (I − QQᵀ) M L⁻¹, L⁻¹ = Fᵀ
            grad_y = _normalisation_backward(Y_hat, norms, H)  # (B, m, c)
            # As the forward: the products accumulate in g's dtype from low-precision operands.
            gQ_g, Q_g = gQ.to(g.dtype), Q_mm.to(g.dtype)
            if not ctx.complement:
                grad_x = gQ_g @ Q_g.mT
            else:
                grad_x = torch.baddbmm(g, gQ_g, Q_g.mT, alpha=-1.0)
            # Through Y = xᵀΩ: += Ω (∂L/∂Y)ᵀ, the sketch shared by every image.
            sketch_b = sketch_mm.to(g.dtype).expand(grad_x.shape[0], -1, -1)  # (B, N, c), no copy
            grad_x.baddbmm_(sketch_b, grad_y.to(mm_dtype).to(g.dtype).mT)
        return grad_x, None, grad_scale, None, None


def ridge_project(
    x: Tensor, sketch: Tensor, *, eps: float, complement: bool = False, scale: Tensor | None = None
) -> Tensor:
    """Project the rows of ``x`` onto (or off) the sketched dominant space of ``xᵀ``, optionally scaled.

    ``Y = xᵀΩ`` per batch element spans the dominant column space of ``xᵀ``; with ``Q = ridge_basis(Y)`` and the
    soft projector ``Π = QQᵀ``, the result is ``scale·xΠ`` or, with ``complement``, ``scale·(x − xΠ)``. ``Π`` is
    applied as ``(xQ)Qᵀ`` (no m × m matrix is formed) and the backward is in closed form. The basis is computed in
    (at least) float32; the products run in the dtype autocast would choose. The sketch gets no gradient.

    Args:
        x: Rows, shape (B, N, m).
        sketch: Ω, shape (N, c) with ``c <= m``, shared by the batch.
        eps: Ridge ε of the basis.
        complement: Return the part outside the sketched space, ``x − xΠ``, instead of ``xΠ``.
        scale: Optional 0-dim tensor multiplying the result (differentiable).

    Returns:
        Tensor of the shape and dtype of ``x``.
    """
    return _RidgeProject.apply(x, sketch, scale, eps, complement)
