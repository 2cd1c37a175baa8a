"""Compress: pull each token into the dominant part of the learned subspaces, weighted by memberships π."""

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from pace.layers._validate import check_sizes
from pace.layers.basis import _no_autocast, ridge_basis, ridge_project, validate_projector, wide_matmul
from pace.layers.sketch import SketchedModule

COMPRESS_FORMS = ("full", "diag")


def validate_compress_form(form: str) -> str:
    """Check a Compress form name.

    Args:
        form: ``"full"`` (the paper's projector) or ``"diag"`` (the reference code's diagonal scaling).

    Returns:
        ``form`` unchanged.
    """
    if form not in COMPRESS_FORMS:
        raise ValueError(f"compress_form must be one of {COMPRESS_FORMS}, got {form!r}")
    return form


def _membership_logits_from_squares(sq_norms: Tensor, tau: Tensor) -> Tensor:
    # ‖col‖ / τ from ‖col‖², in at least float32; clamping at the smallest normal number keeps the gradient of
    # the square root finite (zero) for a token with no component in the sketched space.
    work = sq_norms.to(torch.promote_types(sq_norms.dtype, torch.float32))
    return work.clamp_min(torch.finfo(work.dtype).tiny).sqrt() / tau


def compress(
    x: Tensor,
    subspaces: Tensor,
    tau: Tensor,
    sketch: Tensor,
    *,
    num_heads: int,
    eps: float,
    exact: bool = False,
    form: str = "full",
    scale: Tensor | None = None,
    add_to: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Compression update Σ_k U_k (π_k ⊙ (a_k − col_k)) for all heads at once, and the memberships π.

    Per head k: ``a_k = U_kᵀx`` (p), ``Y_k = A_k Ω`` (p × r), ``Q_k = ridge_basis(Y_k)`` (one batched Cholesky over
    images and heads). ``form="full"``: ``col_k = Q_k(Q_kᵀa_k)``, the paper's projection. ``form="diag"``:
    ``col_k = diag(Q_kQ_kᵀ) ⊙ a_k``, what the reference code computes (its einsum repeats an index, which takes a
    diagonal); the diagonal is the row-wise sum of squares of ``Q_k``. ``null_k = a_k − col_k``,
    ``π = softmax_k(‖col_k‖ / τ)``. No p × p projector is formed and no Python loop runs over heads.

    The update is ``w Uᵀ`` with the weighted null-space coordinates ``w_k = π_k ⊙ (a_k − col_k)``; ``scale`` and
    ``add_to`` fold a step size and another term into that last product (one ``addmm``), as
    :func:`pace.layers.pace_attention.pace_attention` does with ``−β`` and the expansion term.

    Args:
        x: Tokens, shape (B, N, C).
        subspaces: ``U = [U_1 … U_K]``, shape (C, K·p).
        tau: Temperature τ, a 0-dim tensor.
        sketch: Ω, shape (N, r) with ``r <= p``, shared by all heads.
        num_heads: K.
        eps: Ridge ε of the basis.
        exact: Use the exact (orthogonal) projector instead of the ridge one.
        form: ``"full"`` or ``"diag"``.
        scale: A 0-dim tensor multiplying the update (None: 1).
        add_to: A (B, N, C) tensor the (scaled) update is added to (None: nothing).

    Returns:
        ``(out, memberships)``: out of shape (B, N, C) in the dtype of ``x``; memberships π of shape (B, N, K) in
        the dtype of ``x``, summing to 1 over K.
    """
    validate_compress_form(form)
    B, N, C = x.shape
    K = num_heads
    p = subspaces.shape[1] // K
    # a in (at least) float32 even under autocast: ‖col_k‖, the softmax and the τ gradient need more than bf16.
    a = wide_matmul(x.reshape(B * N, C), subspaces).view(B, N, K * p)  # a_k = U_kᵀx, heads side by side
    # The per-head work runs on the float32 coordinates a without autocast: ‖col_k‖ feeds the softmax and the τ
    # gradient, and rounding a, Y_k, Q_k or a_kQ_k to bf16 on the way there doubled the τ gradient's error over
    # the floor that the bf16 tokens set (docs/benchmarks.md). Only the last product runs in autocast's dtype.
    with _no_autocast(a.device.type):
        if form == "diag":
            # Token-major throughout: diag(Q_kQ_kᵀ) scales coordinates, so no head needs its own matrix product.
            Y = (a.mT @ sketch.to(a.dtype)).view(B * K, p, -1)  # Y_k = A_k Ω: (B·K, p, r)
            Q = ridge_basis(Y, eps=eps, exact=exact)  # (B·K, p, r), float32
            keep = Q.square().sum(-1).view(B, K, p).to(a.dtype)  # diag(Q_kQ_kᵀ)
            # ‖col_k‖² = Σ_p diag² a², for all heads in one product with a block-diagonal (K·p × K) matrix per image.
            blocks = keep.square().unsqueeze(-1) * torch.eye(K, device=a.device, dtype=a.dtype).unsqueeze(1)
            pi = torch.softmax(_membership_logits_from_squares((a * a) @ blocks.view(B, K * p, K), tau), dim=-1)
            # null_k = (1 − diag) ⊙ a_k
            w = a.view(B, N, K, p) * pi.unsqueeze(-1).to(a.dtype) * (1 - keep).unsqueeze(1)  # (B, N, K, p)
            w = w.view(B, N, K * p)
        else:
            a_h = a.view(B, N, K, p).transpose(1, 2).reshape(B * K, N, p)  # (B·K, N, p): one matrix per image and head
            if exact:
                Q = ridge_basis(a_h.mT @ sketch.to(a.dtype), eps=eps, exact=True).to(a.dtype)  # (B·K, p, r)
                col = (a_h @ Q) @ Q.mT
            else:
                col = ridge_project(a_h, sketch, eps=eps)  # (B·K, N, p) = Q_kQ_kᵀ a_k
            norms = torch.linalg.vector_norm(col, dim=-1, dtype=torch.promote_types(col.dtype, torch.float32))
            pi = torch.softmax(norms.view(B, K, N) / tau, dim=1)  # (B, K, N)
            null = (a_h - col).view(B, K, N, p)
            w = (null * pi.unsqueeze(-1).to(null.dtype)).transpose(1, 2).reshape(B, N, K * p)  # (B, N, K·p)
            pi = pi.transpose(1, 2)
    u = subspaces.to(w.dtype) if scale is None else subspaces.to(w.dtype) * scale.to(w.dtype)  # (C, K·p)
    if add_to is None:
        out = w.reshape(B * N, -1) @ u.mT  # (B·N, C)
    else:
        out = torch.addmm(add_to.reshape(B * N, C).to(w.dtype), w.reshape(B * N, -1), u.mT)  # (B·N, C)
    return out.view(B, N, C).to(x.dtype), pi.to(x.dtype)


# A leaf for torch.fx / timm feature extraction: its forward manages the sketch in Python.
@register_notrace_module
class Compress(SketchedModule):
    """The compression operator: learned subspaces ``U`` (C × C), temperature τ and a sketch Ω_c (n × rank).

    Built by :class:`pace.layers.PACEAttention`, which holds the defaults of the PACE settings.

    Args:
        dim: Token width C.
        num_heads: Number of subspaces K; ``p = dim // num_heads``.
        rank: Sketch width r (``rank * num_heads <= dim``).
        eps: Ridge ε of the basis.
        projector: ``"ridge"`` or ``"exact"``.
        form: ``"full"`` (paper) or ``"diag"`` (reference code); switched later by assigning ``form``.
        **sketch: The sketch's identity, schedule and factory keywords (``layer_idx``, ``sketch_seed``,
            ``sketch_schedule``, ``device``, ``dtype``), as :class:`pace.layers.SketchedModule` takes them; ``U``
            and τ are made on the sketch's device and dtype.
    """

    def __init__(self, dim: int, num_heads: int, *, rank: int, eps: float, projector: str, form: str, **sketch) -> None:
        check_sizes(dim, num_heads, rank, eps)
        super().__init__(rank, operator="compress", **sketch)
        self.dim = dim
        self.num_heads = num_heads
        self.eps = eps
        self.exact = validate_projector(projector)
        self._form = validate_compress_form(form)
        dd = {"device": self.sketch.device, "dtype": self.sketch.dtype}
        self.subspaces = nn.Parameter(torch.empty(dim, dim, **dd))
        self.tau = nn.Parameter(torch.empty((), **dd))
        self.reset_parameters()

    @property
    def form(self) -> str:
        """The Compress form, ``"full"`` or ``"diag"``."""
        return self._form

    @form.setter
    def form(self, form: str) -> None:
        self._form = validate_compress_form(form)

    def reset_parameters(self) -> None:
        """Orthogonal ``U`` over the whole C × C matrix, τ = 1, and no stored sketch."""
        nn.init.orthogonal_(self.subspaces)
        nn.init.constant_(self.tau, 1.0)
        self.reset_sketch()

    def forward_with_memberships(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the operator and return the memberships too.

        Args:
            x: Tokens (B, N, C).

        Returns:
            ``(out (B, N, C), memberships (B, N, K))``.
        """
        return compress(
            x,
            self.subspaces,
            self.tau,
            self.current_sketch(x.shape[1]),
            num_heads=self.num_heads,
            eps=self.eps,
            exact=self.exact,
            form=self._form,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the operator.

        Args:
            x: Tokens (B, N, C).

        Returns:
            The compression update, shape (B, N, C).
        """
        return self.forward_with_memberships(x)[0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, form={self._form!r}, " + super().extra_repr()
