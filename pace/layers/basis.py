"""Orthonormal-ish basis of a sketched column space: the ridge-regularised Cholesky step of PACEAttention."""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

PROJECTORS = ("ridge", "exact")


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


def ridge_basis(Y: Tensor, *, eps: float, exact: bool = False) -> Tensor:
    """Basis ``Q`` of the column space of each sketch ``Y``, batched, computed in (at least) float32.

    Ridge mode (the reference's step): the columns of ``Y`` are scaled to unit norm (``Ŷ``), then
    ``G = ŶᵀŶ + εI = L Lᵀ`` and ``Q = Ŷ L⁻ᵀ`` through a triangular solve. ``QQᵀ = Ŷ (ŶᵀŶ + εI)⁻¹ Ŷᵀ`` is a soft
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
    # Autocast would run the Gram product in bf16/fp16, and the Cholesky needs it in full precision. The meta
    # device (shape-only runs) has no autocast backend.
    no_autocast = (
        contextlib.nullcontext()
        if Y.device.type == "meta"
        else torch.autocast(device_type=Y.device.type, enabled=False)
    )
    with no_autocast:
        Y_hat = F.normalize(Y.to(work_dtype), dim=-2)  # (B, m, c), unit columns
        if exact:
            return torch.linalg.qr(Y_hat, mode="reduced").Q
        c = Y_hat.shape[-1]
        eye = torch.eye(c, device=Y_hat.device, dtype=work_dtype)
        G = Y_hat.mT @ Y_hat + eps * eye  # (B, c, c)
        L = torch.linalg.cholesky_ex(G).L
        # Q Lᵀ = Ŷ  ->  Q = Ŷ L⁻ᵀ, solved on the right against the upper-triangular Lᵀ.
        return torch.linalg.solve_triangular(L.mT, Y_hat, upper=True, left=False)
