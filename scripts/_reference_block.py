"""The authors' formulation of a PACE block, written for benchmarking only (not part of the package).

Same mathematics as :class:`pace.layers.PACEBlock`, computed the way the reference implementation organises it:
tokens transposed to (b, d, n), the ridge basis obtained by inverting the Cholesky factor against the identity,
explicit projector matrices (a d × d one per image for Expand, a p × p one per image and head for Compress) that
multiply the tokens, one Cholesky call per head in a Python loop, and ``torch.linalg.cholesky`` (which checks the
factorisation's status, a host synchronisation on a GPU). Its parameters and sketches are copied from a
``PACEBlock``, so the two compute the same function and their outputs can be compared.

References:
    https://github.com/SHIELD-SKY/PACEAttention (model/ECAttention.py, utils.py: the authors' Expand, Compress
    and Cholesky orthogonalisation)
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pace.layers import PACEBlock


def reference_basis(Y: Tensor, eps: float) -> Tensor:
    """Ridge basis Q = Ŷ L⁻ᵀ for a batch of sketches (b, m, c), through an explicit inverse of Lᵀ."""
    dtype = Y.dtype
    Y_hat = F.normalize(Y.float(), dim=-2)  # (b, m, c)
    eye = torch.eye(Y.shape[-1], device=Y.device, dtype=torch.float32)
    L = torch.linalg.cholesky(Y_hat.mT @ Y_hat + eps * eye)  # (b, c, c)
    inv_LT = torch.linalg.solve_triangular(L.mT, eye.expand_as(L), upper=True)  # (b, c, c)
    return (Y_hat @ inv_LT).to(dtype)


class ReferenceBlock(nn.Module):
    """A PACE block in the authors' formulation, initialised from (a copy of) a ``PACEBlock``'s state.

    Args:
        block: The block whose norm, subspaces, τ, α, β, Compress form and stored sketches are copied. Its
            sketches must be drawn (run one training forward first) for the token count used.
    """

    def __init__(self, block: PACEBlock) -> None:
        super().__init__()
        attn = block.attn
        self.norm = block.norm.__class__(block.norm.normalized_shape, eps=block.norm.eps)
        self.norm.load_state_dict(block.norm.state_dict())
        self.num_heads = attn.compress.num_heads
        self.eps = attn.compress.eps
        self.form = attn.compress.form
        self.positive_coeffs = attn.positive_coeffs
        self.subspaces = nn.Parameter(attn.compress.subspaces.detach().clone())
        self.tau = nn.Parameter(attn.compress.tau.detach().clone())
        self.alpha = nn.Parameter(attn.alpha.detach().clone())
        self.beta = nn.Parameter(attn.beta.detach().clone())
        self.register_buffer("expand_sketch", attn.expand.sketch.detach().clone())
        self.register_buffer("compress_sketch", attn.compress.sketch.detach().clone())

    def _expand(self, x: Tensor) -> Tensor:
        x_t = x.transpose(1, 2)  # (b, d, n)
        Q = reference_basis(x_t @ self.expand_sketch.to(x.dtype), self.eps)  # (b, d, rK)
        projector = Q @ Q.transpose(1, 2)  # (b, d, d)
        return (x_t - projector @ x_t).transpose(1, 2)  # (b, n, d)

    def _compress(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        K = self.num_heads
        U = self.subspaces.to(x.dtype)
        U_heads = U.T.reshape(K, d // K, d)  # (K, p, d): row block k is U_kᵀ
        coords = torch.einsum("kpd,bdn->bkpn", U_heads, x.transpose(1, 2))  # (b, K, p, n)
        sketch = self.compress_sketch.to(x.dtype)
        bases = [reference_basis(coords[:, k] @ sketch, self.eps) for k in range(K)]  # K × (b, p, r)
        Q = torch.stack(bases, dim=1)  # (b, K, p, r)
        projector = Q @ Q.transpose(-1, -2)  # (b, K, p, p)
        if self.form == "full":
            col = projector @ coords
        else:
            # A repeated index in one einsum operand reads its diagonal: diag(QQᵀ) ⊙ a, the authors' form.
            col = torch.einsum("bkpp,bkpn->bkpn", projector, coords)
        null = coords - col
        norms = torch.linalg.vector_norm(col.permute(0, 3, 1, 2), dim=-1)  # (b, n, K)
        pi = torch.softmax(norms / self.tau, dim=-1)  # (b, n, K)
        weighted = torch.einsum("bnk,bkpn->bkpn", pi, null).reshape(b, d, n)  # (b, K·p, n)
        return (U @ weighted).transpose(1, 2)  # (b, n, d)

    def _coefficient(self, raw: Tensor) -> Tensor:
        return F.softplus(raw) if self.positive_coeffs else raw

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to tokens (b, n, d)."""
        h = self.norm(x)
        return x + self._coefficient(self.alpha) * self._expand(h) - self._coefficient(self.beta) * self._compress(h)
