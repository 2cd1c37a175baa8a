"""Expand: push each token out of the dominant column space of its image, (I − QQᵀ)x."""

from timm.layers import register_notrace_module
from torch import Tensor

from pace.layers._validate import check_sizes
from pace.layers.basis import ridge_basis, ridge_project, validate_projector
from pace.layers.sketch import SketchedModule


def expand(x: Tensor, sketch: Tensor, *, eps: float, exact: bool = False) -> Tensor:
    """Null-space part of every token with respect to the sketched column space of its image.

    ``Y = xᵀΩ`` (C × c per image) spans the dominant feature directions, ``Q = ridge_basis(Y)``, and the result
    is ``(I − QQᵀ)x`` per token, applied as ``x − (xQ)Qᵀ`` so that no C × C projector is formed. Cost O(N·C·c).

    Args:
        x: Tokens, shape (B, N, C).
        sketch: Ω, shape (N, c) with ``c <= C``.
        eps: Ridge ε of the basis.
        exact: Use the exact (orthogonal) projector instead of the ridge one.

    Returns:
        Tensor of shape (B, N, C) in the dtype of ``x``.
    """
    if not exact:
        return ridge_project(x, sketch, eps=eps, complement=True)
    Y = x.mT @ sketch.to(x.dtype)  # (B, C, c)
    Q = ridge_basis(Y, eps=eps, exact=True).to(x.dtype)  # (B, C, c)
    return (x - (x @ Q) @ Q.mT).to(x.dtype)


# A leaf for torch.fx / timm feature extraction: its forward manages the sketch in Python.
@register_notrace_module
class Expand(SketchedModule):
    """The expansion operator with its own sketch Ω_e of width ``rank * num_heads``; no parameters.

    Built by :class:`pace.layers.PACEAttention`, which holds the defaults of the PACE settings.

    Args:
        dim: Token width C.
        num_heads: Number of heads K; with ``rank`` it sets the sketch width ``rank * num_heads <= dim``.
        rank: Subspace rank r.
        eps: Ridge ε of the basis.
        projector: ``"ridge"`` or ``"exact"``.
        **sketch: The sketch's identity, schedule and factory keywords (``layer_idx``, ``sketch_seed``,
            ``sketch_schedule``, ``device``, ``dtype``), as :class:`pace.layers.SketchedModule` takes them.
    """

    def __init__(self, dim: int, num_heads: int, *, rank: int, eps: float, projector: str, **sketch) -> None:
        check_sizes(dim, num_heads, rank, eps)
        super().__init__(rank * num_heads, operator="expand", **sketch)
        self.dim = dim
        self.eps = eps
        self.exact = validate_projector(projector)

    def reset_parameters(self) -> None:
        """Drop the stored sketch (Expand has no parameters)."""
        self.reset_sketch()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the operator.

        Args:
            x: Tokens (B, N, C).

        Returns:
            (I − QQᵀ)x, shape (B, N, C).
        """
        return expand(x, self.current_sketch(x.shape[1]), eps=self.eps, exact=self.exact)
