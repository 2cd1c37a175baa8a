"""Dense reference formulation of PACEAttention, written directly from the formulas; test oracle only.

It forms every projector as an explicit matrix, loops over images and heads in Python and works in float64:
slow and memory-hungry by design, so the fast batched path in ``pace.layers`` has something independent to be
compared with.
"""

import torch
from torch import Tensor


def dense_projector(Y: Tensor, *, eps: float, exact: bool) -> Tensor:
    """Projector matrix (m × m) onto the column space of one sketch Y (m × c).

    Ridge: ``Ŷ (ŶᵀŶ + εI)⁻¹ Ŷᵀ`` with unit-norm columns ``Ŷ``. Exact: the orthogonal projector ``Y Y⁺``.
    """
    Y = Y.double()
    if exact:
        return Y @ torch.linalg.pinv(Y)
    Y_hat = Y / Y.norm(dim=0, keepdim=True)
    G = Y_hat.T @ Y_hat + eps * torch.eye(Y.shape[1], dtype=Y.dtype)
    return Y_hat @ torch.linalg.solve(G, Y_hat.T)


def dense_expand(x: Tensor, sketch: Tensor, *, eps: float, exact: bool) -> Tensor:
    """(I − P)z for every token z of every image, with P built from Y = ZΩ, Z = xᵀ (d × n)."""
    out = []
    for image in x.double():
        Z = image.T  # (d, n)
        P = dense_projector(Z @ sketch.double(), eps=eps, exact=exact)
        out.append((torch.eye(Z.shape[0], dtype=Z.dtype) - P) @ Z)
    return torch.stack(out).transpose(1, 2)


def dense_compress(
    x: Tensor, subspaces: Tensor, tau: float, sketch: Tensor, *, num_heads: int, eps: float, exact: bool, form: str
) -> tuple[Tensor, Tensor]:
    """Σ_k U_k (π_k ⊙ null_k) and π for every image, one head at a time."""
    U_all = subspaces.double()
    p = U_all.shape[1] // num_heads
    outs, memberships = [], []
    for image in x.double():
        Z = image.T  # (d, n)
        cols, nulls, heads = [], [], []
        for k in range(num_heads):
            U_k = U_all[:, k * p : (k + 1) * p]  # (d, p)
            A = U_k.T @ Z  # (p, n)
            P = dense_projector(A @ sketch.double(), eps=eps, exact=exact)  # (p, p)
            col = P @ A if form == "full" else torch.diag(P)[:, None] * A
            cols.append(col)
            nulls.append(A - col)
            heads.append(U_k)
        norms = torch.stack([c.norm(dim=0) for c in cols])  # (K, n)
        pi = torch.softmax(norms / tau, dim=0)  # (K, n)
        out = sum(U_k @ (null * pi[k]) for k, (U_k, null) in enumerate(zip(heads, nulls)))  # (d, n)
        outs.append(out.T)
        memberships.append(pi.T)
    return torch.stack(outs), torch.stack(memberships)


def dense_coding_rate(Z: Tensor, eps: float) -> Tensor:
    """½ logdet(I_n + d/(n ε²) XXᵀ) per image, in the n × n form (tokens X as rows)."""
    _, n, d = Z.shape
    X = Z.double()
    eye = torch.eye(n, dtype=X.dtype)
    return 0.5 * torch.logdet(eye + d / (n * eps**2) * X @ X.transpose(1, 2))


def dense_compression_rate(Z: Tensor, subspaces: Tensor, num_heads: int, eps: float) -> Tensor:
    """½ Σ_k logdet(I_n + p/(n ε²) (XU_k)(XU_k)ᵀ) per image, in the n × n form."""
    _, n, _ = Z.shape
    X, U = Z.double(), subspaces.double()
    p = U.shape[1] // num_heads
    eye = torch.eye(n, dtype=X.dtype)
    total = torch.zeros(Z.shape[0], dtype=X.dtype)
    for k in range(num_heads):
        A = X @ U[:, k * p : (k + 1) * p]  # (B, n, p)
        total = total + 0.5 * torch.logdet(eye + p / (n * eps**2) * A @ A.transpose(1, 2))
    return total
