"""The ridge step's small dense work as torch custom ops, Triton where it can run and PyTorch elsewhere.

``normalized_gram``: column scales and ``G = ŶᵀŶ + εI`` of sketches Y in one pass over Y.
``inverse_cholesky_factor``: ``F = L⁻ᵀ`` with ``G = L Lᵀ``, so ``F Fᵀ = G⁻¹`` and ``Q = Ŷ F``.

Both are registered as ``pace::`` custom ops with fake (shape) implementations and backward formulas written in
PyTorch, so ``torch.compile(fullgraph=True)`` traces through them without graph breaks and autograd works on
every backend. The backend is chosen per call (see ``pace.kernels._dispatch``).
"""

import torch
from torch import Tensor

from pace.kernels import _dispatch

# Above this size the blocked kernel's sequential tile loop would be slower than cuSOLVER; use PyTorch.
MAX_TRITON_FACTOR_SIZE = 512
COLUMN_NORM_FLOOR = 1e-12  # as F.normalize and pace.layers.basis


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def inverse_cholesky_factor_reference(G: Tensor, row_scale: Tensor | None = None) -> Tensor:
    """PyTorch ``F = chol(G)⁻ᵀ``: ``cholesky_ex`` and one triangular solve against I (no status check, no sync).

    Args:
        G: Symmetric positive definite matrices, shape (..., c, c); only the lower triangle is read.
        row_scale: Optional (..., c): then ``D⁻¹F`` with ``D = diag(row_scale)``.

    Returns:
        Upper-triangular F, same shape, in float32 (float64 for float64 input), with ``F Fᵀ = G⁻¹``.
    """
    G = G.to(_work_dtype(G.dtype))
    L = torch.linalg.cholesky_ex(G).L
    eye = torch.eye(G.shape[-1], device=G.device, dtype=G.dtype)
    F = torch.linalg.solve_triangular(L.mT, eye, upper=True)  # Lᵀ F = I
    return F if row_scale is None else F / row_scale.to(F.dtype).unsqueeze(-1)


def normalized_gram_reference(Y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """PyTorch column scales and ridge Gram matrix of sketches Y, as ``pace.layers.basis`` computes them.

    Args:
        Y: Sketches, shape (B, m, c), any floating dtype.
        eps: Ridge ε added to the diagonal.

    Returns:
        ``scale = max(‖Y[:, :, j]‖, 1e-12)`` of shape (B, 1, c) and ``G = ŶᵀŶ + εI`` with ``Ŷ = Y / scale``,
        shape (B, c, c), both float32 (float64 for float64 input).
    """
    Y = Y.to(_work_dtype(Y.dtype))
    gram = Y.mT @ Y  # (B, c, c): one pass over Y; the squared column norms are its diagonal
    # Clamped before the root as well, so that a zero column has a zero (not NaN) gradient.
    squares = gram.diagonal(dim1=-2, dim2=-1).clamp_min(COLUMN_NORM_FLOOR**2)
    scale = squares.sqrt().clamp_min(COLUMN_NORM_FLOOR).unsqueeze(-2)  # (B, 1, c)
    G = gram / (scale.mT * scale)  # ŶᵀŶ = D⁻¹ YᵀY D⁻¹
    return scale, G + eps * torch.eye(G.shape[-1], device=G.device, dtype=G.dtype)


# ---- pace::inverse_cholesky_factor -------------------------------------------------------------------------------


@torch.library.custom_op("pace::inverse_cholesky_factor", mutates_args=())
def _inverse_cholesky_factor_op(G: Tensor, row_scale: Tensor | None) -> Tensor:
    c = G.shape[-1]
    module = _dispatch.triton_module(G) if G.dtype != torch.float64 and c <= MAX_TRITON_FACTOR_SIZE else None
    if module is None:
        return inverse_cholesky_factor_reference(G, row_scale).contiguous()
    flat = G.reshape(-1, c, c).to(torch.float32)  # (B, c, c)
    scale = None if row_scale is None else row_scale.reshape(-1, c).to(torch.float32).contiguous()  # (B, c)
    return module.inverse_cholesky_factor(flat, row_scale=scale).reshape(G.shape)


@_inverse_cholesky_factor_op.register_fake
def _(G: Tensor, row_scale: Tensor | None) -> Tensor:
    return G.new_empty(G.shape, dtype=_work_dtype(G.dtype))


def _inverse_cholesky_factor_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output, inputs[1])


def _inverse_cholesky_factor_backward(ctx, F_bar: Tensor) -> tuple[Tensor, Tensor | None]:
    # dF = −F Φ(Fᵀ dG F)ᵀ with Φ = lower triangle, diagonal halved. Its adjoint, symmetrised (G is symmetric):
    # Ḡ = −½ F Ψ Fᵀ, Ψ the symmetric matrix with the upper triangle (and diagonal) of M = Fᵀ F̄. When the loss
    # depends on F only through F Fᵀ, M is symmetric and this is −½ F M Fᵀ. With row scales s the output is
    # F_s = D⁻¹F: F̄ = D⁻¹F̄_s and s̄_j = −Σ_k F̄_s,jk F_s,jk / s_j.
    F, s = ctx.saved_tensors
    F_bar = F_bar.to(F.dtype)
    s_bar = None
    if s is not None:
        s_w = s.to(F.dtype).unsqueeze(-1)
        s_bar = (-(F_bar * F).sum(-1, keepdim=True) / s_w).squeeze(-1).to(s.dtype)
        F, F_bar = F * s_w, F_bar / s_w
    M = F.mT @ F_bar  # (..., c, c)
    upper = M.triu(1)
    Psi = upper + upper.mT + torch.diag_embed(M.diagonal(dim1=-2, dim2=-1))
    return -0.5 * (F @ Psi @ F.mT), s_bar


_inverse_cholesky_factor_op.register_autograd(
    _inverse_cholesky_factor_backward, setup_context=_inverse_cholesky_factor_setup
)


def inverse_cholesky_factor(G: Tensor, row_scale: Tensor | None = None) -> Tensor:
    """Explicit inverse Cholesky factor ``F = L⁻ᵀ`` of SPD matrices ``G = L Lᵀ`` (the custom op ``pace::…``).

    ``F`` is upper triangular with ``F Fᵀ = G⁻¹``, so the ridge basis ``Q = Ŷ L⁻ᵀ`` is the product ``Ŷ F`` and
    the backward's ``H L⁻¹`` is ``H Fᵀ``. Triton (CUDA, or the interpreter when forced) for float32 G with
    ``c <= 512``: one program per matrix, a register tile up to c = 32 and 32 × 32 tiles merged with fp32
    ``tl.dot`` above; elsewhere ``cholesky_ex`` + ``solve_triangular``. No status check: G must be SPD (the ridge
    Gram ``ŶᵀŶ + εI`` is); a non-SPD input gives NaN or garbage, never an exception or a host sync.
    Differentiable (backward in PyTorch). With ``row_scale`` it returns ``D⁻¹F`` (the ridge step's ``F_s``, whose
    row j is divided by ``row_scale[..., j]``), divided in the kernel's last pass rather than in a pass of its own.

    Args:
        G: Shape (..., c, c), float32 (float64 and lower precisions go through PyTorch; low precision is promoted).
        row_scale: Optional positive scales of F's rows, shape (..., c).

    Returns:
        F (or D⁻¹F), same shape, float32 (float64 for float64 input), contiguous, exact zeros below the diagonal.
    """
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"inverse_cholesky_factor: G must have shape (..., c, c), got {tuple(G.shape)}")
    if row_scale is not None and row_scale.shape != G.shape[:-1]:
        raise ValueError(
            f"inverse_cholesky_factor: row_scale must have shape {tuple(G.shape[:-1])}, got {tuple(row_scale.shape)}"
        )
    return _inverse_cholesky_factor_op(G, row_scale)


# ---- pace::normalized_gram ---------------------------------------------------------------------------------------


@torch.library.custom_op("pace::normalized_gram", mutates_args=())
def _normalized_gram_op(Y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    module = _dispatch.triton_module(Y) if Y.dtype in (torch.float32, torch.bfloat16, torch.float16) else None
    if module is None:
        scale, G = normalized_gram_reference(Y, eps)
        return scale.contiguous(), G.contiguous()
    return module.normalized_gram(Y, eps)


@_normalized_gram_op.register_fake
def _(Y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    batch, _, c = Y.shape
    dtype = _work_dtype(Y.dtype)
    return Y.new_empty((batch, 1, c), dtype=dtype), Y.new_empty((batch, c, c), dtype=dtype)


def _normalized_gram_setup(ctx, inputs, output) -> None:
    Y, _ = inputs
    scale, _ = output
    ctx.save_for_backward(Y, scale)


def _normalized_gram_backward(ctx, scale_bar: Tensor | None, G_bar: Tensor | None) -> tuple[Tensor, None]:
    # G = ŶᵀŶ + εI: Ŷ̄ = Ŷ (Ḡ + Ḡᵀ). Ŷ = Y / s with s = max(‖y‖, 1e-12): Ȳ = Ŷ̄ / s + Ŷ (s̄ − ⟨Ŷ, Ŷ̄⟩ / s), the last
    # (radial) term only where the norm was not clamped.
    Y, scale = ctx.saved_tensors
    Y_hat = Y.to(scale.dtype) / scale  # (B, m, c)
    grad = torch.zeros_like(Y_hat)
    radial = torch.zeros_like(scale)
    if G_bar is not None:
        H = Y_hat @ (G_bar + G_bar.mT).to(scale.dtype)
        grad = H / scale
        radial = -(Y_hat * H).sum(-2, keepdim=True) / scale
    if scale_bar is not None:
        radial = radial + scale_bar.to(scale.dtype)
    grad = grad + Y_hat * (radial * (scale > COLUMN_NORM_FLOOR))
    return grad.to(Y.dtype), None


_normalized_gram_op.register_autograd(_normalized_gram_backward, setup_context=_normalized_gram_setup)


def normalized_gram(Y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Column scales and ridge Gram matrix ``G = ŶᵀŶ + εI`` of sketches Y in one pass (custom op ``pace::…``).

    ``Ŷ = Y / scale`` is never written: ``Q = Ŷ F = Y (F / scaleᵀ)`` folds the scale into the small factor. The
    Triton kernel (float32, bfloat16, float16 Y) accumulates ``YᵀY`` and the squared column norms in fp32 from
    one read of Y and scales the fp32 tile at the end; it equals the PyTorch path (normalise in fp32, then the
    product) up to fp32 rounding. Squared norms beyond fp32's range (column norms above ~1e19) overflow there.
    Differentiable in Y (backward in PyTorch).

    Args:
        Y: Sketches, shape (B, m, c).
        eps: Ridge ε added to the diagonal.

    Returns:
        ``scale`` (B, 1, c) and ``G`` (B, c, c), float32 (float64 for float64 Y), contiguous.
    """
    if Y.dim() != 3:
        raise ValueError(f"normalized_gram: Y must have shape (B, m, c), got {tuple(Y.shape)}")
    return _normalized_gram_op(Y, float(eps))


# ---- pace::ridge_gradient_matrix ---------------------------------------------------------------------------------


def ridge_gradient_matrix_reference(
    W: Tensor, F_s: Tensor, G: Tensor, scale: Tensor, eps: float, coef: float = 1.0
) -> Tensor:
    """PyTorch ``coef·Γ``, ``Γ = G_s + 2 diag(ρ / s²)`` of the ridge backward (see :func:`ridge_gradient_matrix`).

    Args:
        W: ``YᵀQ̄``, shape (B, c, c).
        F_s: ``D⁻¹F``, shape (B, c, c).
        G: ``ŶᵀŶ + εI``, shape (B, c, c).
        scale: Column norms clamped at 1e-12, shape (B, 1, c).
        eps: The ε inside G.
        coef: A factor of the result.

    Returns:
        coef·Γ, shape (B, c, c), in W's dtype.
    """
    return _scaled_(_add_radial_diagonal_(W, F_s, G, symmetric_gradient(W, F_s), scale, eps), coef)


def _scaled_(t: Tensor, coef: float) -> Tensor:
    return t if coef == 1 else t.mul_(coef)


def symmetric_gradient(W: Tensor, F_s: Tensor, half: bool = False) -> Tensor:
    """``G_s = F_s(A + Aᵀ)F_sᵀ`` with ``A = F_sᵀW`` (``D⁻¹ G̃ D⁻¹`` with ``G̃ = −4 ∂L/∂G``), four batched ATen ops;
    with ``half``, ``H = F_s A F_sᵀ`` (``G_s = H + Hᵀ``), three products and no sum."""
    A = F_s.mT @ W
    return (F_s @ A) @ F_s.mT if half else (F_s @ (A + A.mT)) @ F_s.mT


def _add_radial_diagonal_(W: Tensor, F_s: Tensor, G: Tensor, G_s: Tensor, scale: Tensor, eps: float) -> Tensor:
    # G_s += 2 diag(ρ/s²), in place: ρ_j / s_j² from row-wise dot products (one batched product each).
    s = scale.squeeze(-2)  # (B, c)
    rows = torch.addcmul(
        torch.einsum("bjk,bjk->bj", W, F_s), s.square(), G_s.diagonal(dim1=-2, dim2=-1), value=0.5 * eps
    )
    rows = torch.sub(rows / s, torch.einsum("bjk,bjk->bj", G, G_s * scale), alpha=0.5)
    rho = torch.where(s > COLUMN_NORM_FLOOR, rows / s, 0.0)  # ρ / s², (B, c)
    G_s.diagonal(dim1=-2, dim2=-1).add_(rho, alpha=2)
    return G_s


@torch.library.custom_op("pace::ridge_gradient_matrix", mutates_args=())
def _ridge_gradient_matrix_op(W: Tensor, F_s: Tensor, G: Tensor, scale: Tensor, eps: float, coef: float) -> Tensor:
    supported = all(t.dtype == torch.float32 for t in (W, F_s, G, scale)) and W.shape[-1] <= 32
    module = _dispatch.triton_module(W, "_triton_ridge_bwd") if supported else None
    if module is None:
        return ridge_gradient_matrix_reference(W, F_s, G, scale, eps, coef)
    tensors = (t.contiguous() for t in (W, F_s, G, scale))
    return module.ridge_gradient_matrix(*tensors, eps, coef)


@_ridge_gradient_matrix_op.register_fake
def _(W: Tensor, F_s: Tensor, G: Tensor, scale: Tensor, eps: float, coef: float) -> Tensor:
    return W.new_empty(W.shape)


def ridge_gradient_matrix(W: Tensor, F_s: Tensor, G: Tensor, scale: Tensor, eps: float, coef: float = 1.0) -> Tensor:
    """``coef·Γ``, the c × c matrix of the ridge backward ``∂L/∂Y = Q̄ F_sᵀ − ½ Y Γ`` (custom op ``pace::…``; no
    autograd). Γ is linear in W; the layers take coef = −½, so that ∂L/∂Y is one sum of products.

    ``Γ = G_s + 2 diag(ρ / s²)`` with ``A = F_sᵀW``, ``G_s = F_s(A + Aᵀ)F_sᵀ`` and the radial term
    ``ρ_j / s_j² = ((Σ_k W_jk F_s,jk + ½ε s_j² G_s,jj) / s_j − ½ Σ_k G_jk G_s,jk s_k) / s_j`` (0 where ``s_j`` was
    clamped); see :func:`pace.layers.basis.ridge_factors_backward`. The Triton kernel (float32, c ≤ 32: the Compress
    ridge) keeps each matrix in one register tile, one program per matrix, fp32 products; elsewhere
    :func:`ridge_gradient_matrix_reference` (about 17 ATen ops).

    Args:
        W: ``YᵀQ̄``, shape (B, c, c).
        F_s: ``D⁻¹F``, shape (B, c, c).
        G: ``ŶᵀŶ + εI``, shape (B, c, c).
        scale: Column norms ``s`` clamped at 1e-12, shape (B, 1, c).
        eps: The ε inside G.
        coef: A factor of the result.

    Returns:
        coef·Γ, shape (B, c, c), in W's dtype.
    """
    B, c = (W.shape[0], W.shape[-1]) if W.dim() == 3 else (0, 0)
    if not (W.shape == F_s.shape == G.shape == (B, c, c) and scale.shape == (B, 1, c)):
        shapes = [tuple(t.shape) for t in (W, F_s, G, scale)]
        raise ValueError(f"ridge_gradient_matrix: W, F_s, G (B, c, c) and scale (B, 1, c) expected, got {shapes}")
    return _ridge_gradient_matrix_op(W, F_s, G, scale, float(eps), float(coef))


@torch.library.custom_op("pace::ridge_radial_diagonal", mutates_args=())
def _ridge_radial_diagonal_op(
    W: Tensor, F_s: Tensor, G: Tensor, G_s: Tensor, scale: Tensor, eps: float, coef: float, half: bool
) -> Tensor:
    module = None
    if all(t.dtype == torch.float32 for t in (W, F_s, G, G_s, scale)):
        module = _dispatch.triton_module(W, "_triton_ridge_bwd")
    if module is None:
        G_s = G_s + G_s.mT if half else G_s.clone()
        return _scaled_(_add_radial_diagonal_(W, F_s, G, G_s, scale, eps), coef)
    tensors = (t.contiguous() for t in (W, F_s, G, G_s, scale))
    return module.ridge_radial_diagonal(*tensors, eps, coef, half=half)


@_ridge_radial_diagonal_op.register_fake
def _(W: Tensor, F_s: Tensor, G: Tensor, G_s: Tensor, scale: Tensor, eps: float, coef: float, half: bool) -> Tensor:
    return W.new_empty(W.shape)


def ridge_radial_diagonal(
    W: Tensor, F_s: Tensor, G: Tensor, G_s: Tensor, scale: Tensor, eps: float, coef: float = 1.0, half: bool = False
) -> Tensor:
    """``coef·Γ``, ``Γ = G_s + 2 diag(ρ / s²)`` from a given ``G_s`` (custom op ``pace::…``; no autograd): the part of
    :func:`ridge_gradient_matrix` after its products, for any c. The Triton kernel (float32) reads each matrix once
    per block of 16 rows; elsewhere about 12 ATen ops.

    Args:
        W: ``YᵀQ̄``, shape (B, c, c).
        F_s: ``D⁻¹F``, shape (B, c, c).
        G: ``ŶᵀŶ + εI``, shape (B, c, c).
        G_s: :func:`symmetric_gradient` of W and F_s, shape (B, c, c); with ``half``, its half H (G_s = H + Hᵀ,
            ``symmetric_gradient(W, F_s, half=True)``), which the kernel reads by rows and by columns (no pass to
            form the sum).
        scale: Column norms clamped at 1e-12, shape (B, 1, c).
        eps: The ε inside G.
        coef: A factor of the result.
        half: G_s is given as H.

    Returns:
        coef·Γ, shape (B, c, c), a new tensor in W's dtype.
    """
    B, c = (W.shape[0], W.shape[-1]) if W.dim() == 3 else (0, 0)
    if not (W.shape == F_s.shape == G.shape == G_s.shape == (B, c, c) and scale.shape == (B, 1, c)):
        shapes = [tuple(t.shape) for t in (W, F_s, G, G_s, scale)]
        raise ValueError(f"ridge_radial_diagonal: W, F_s, G, G_s (B, c, c), scale (B, 1, c) expected, got {shapes}")
    return _ridge_radial_diagonal_op(W, F_s, G, G_s, scale, float(eps), float(coef), bool(half))
