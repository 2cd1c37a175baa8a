"""MCR² measures of token batches: coding rate R, compression rate R_c and rate reduction ΔR = R − R_c.

The specification writes one image's tokens as the columns of Z ∈ R^{d×n}; here they are the rows of a
(B, N, C) batch, so ``ZZᵀ`` there is ``XᵀX`` (C × C) here. Each log-determinant is taken in its smaller form,
``logdet(I_n + s AᵀA) = logdet(I_d + s AAᵀ)``, through a Cholesky factor in float64 (``I + PSD`` is positive
definite, so the factor exists).
"""

import torch
from torch import Tensor


def _logdet_identity_plus(G: Tensor, scale: float) -> Tensor:
    """logdet(I + scale·G) for a batch of PSD matrices G (..., m, m), in float64."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky_ex(eye + scale * G).L
    return 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _gram_small(A: Tensor) -> Tensor:
    """``AᵀA`` or ``AAᵀ`` for A (..., n, m), whichever is smaller; both have the same non-zero spectrum."""
    return A.mT @ A if A.shape[-1] <= A.shape[-2] else A @ A.mT


def coding_rate(Z: Tensor, eps: float) -> Tensor:
    """Coding rate R(Z) = ½ logdet(I + d/(n ε²) ZZᵀ) of each image's tokens.

    Args:
        Z: Tokens, shape (B, N, C) (n = N tokens of width d = C).
        eps: Coding precision ε.

    Returns:
        R per image, shape (B,), float64.
    """
    _, N, C = Z.shape
    Z = Z.to(torch.float64)
    return 0.5 * _logdet_identity_plus(_gram_small(Z), C / (N * eps**2))


def compression_rate(Z: Tensor, subspaces: Tensor, num_heads: int, eps: float) -> Tensor:
    """Compression rate R_c(Z | U) = ½ Σ_k logdet(I + p/(n ε²) (U_kᵀZ)(U_kᵀZ)ᵀ) of each image's tokens.

    Args:
        Z: Tokens, shape (B, N, C).
        subspaces: ``U = [U_1 … U_K]``, shape (C, K·p).
        num_heads: K.
        eps: Coding precision ε.

    Returns:
        R_c per image, shape (B,), float64.
    """
    B, N, _ = Z.shape
    p = subspaces.shape[1] // num_heads
    A = (Z.to(torch.float64) @ subspaces.to(torch.float64)).view(B, N, num_heads, p).transpose(1, 2)  # (B, K, N, p)
    return 0.5 * _logdet_identity_plus(_gram_small(A), p / (N * eps**2)).sum(-1)


def rate_reduction(Z: Tensor, subspaces: Tensor, num_heads: int, eps: float) -> Tensor:
    """Rate reduction ΔR = R(Z) − R_c(Z | U).

    Args:
        Z: Tokens, shape (B, N, C).
        subspaces: ``U``, shape (C, K·p).
        num_heads: K.
        eps: Coding precision ε.

    Returns:
        ΔR per image, shape (B,), float64.
    """
    return coding_rate(Z, eps) - compression_rate(Z, subspaces, num_heads, eps)
