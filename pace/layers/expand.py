"""Expand: push each token out of the dominant column space of its image, (I − QQᵀ)x."""

import torch
from torch import Tensor

from pace.layers._validate import check_sizes
from pace.layers.basis import ridge_basis, validate_projector
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
    Y = x.mT @ sketch.to(x.dtype)  # (B, C, c)
    Q = ridge_basis(Y, eps=eps, exact=exact).to(x.dtype)  # (B, C, c)
    return (x - (x @ Q) @ Q.mT).to(x.dtype)


class Expand(SketchedModule):
    """The expansion operator with its own sketch Ω_e of width ``rank * num_heads``; no parameters.

    Args:
        dim: Token width C.
        num_heads: Number of heads K (sets the sketch width with ``rank``).
        rank: Subspace rank r; the sketch has ``rank * num_heads <= dim`` columns.
        eps: Ridge ε of the basis.
        projector: ``"ridge"`` or ``"exact"``.
        layer_idx: Block index (enters the sketch seed).
        sketch_seed: Model-wide sketch seed.
        sketch_schedule: ``"epoch"``, ``"step"`` or ``"fixed"``.
        device: Factory device.
        dtype: Factory dtype.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        rank: int = 20,
        eps: float = 0.01,
        projector: str = "ridge",
        layer_idx: int = 0,
        sketch_seed: int = 0,
        sketch_schedule: str = "epoch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_sizes(dim, num_heads, rank, eps)
        super().__init__(
            rank * num_heads,
            operator="expand",
            layer_idx=layer_idx,
            sketch_seed=sketch_seed,
            sketch_schedule=sketch_schedule,
            device=device,
            dtype=dtype,
        )
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
