"""PACE block: x + DropPath(PACEAttention(norm(x))); pre-norm and no feed-forward network."""

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from pace.layers.pace_attention import PACEAttention

# The reference's LayerNorm eps (1e-6), the default of PACEViT too: one default everywhere.
_REFERENCE_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


class PACEBlock(nn.Module):
    """One PACE layer with its pre-norm and stochastic depth.

    Args:
        dim: Token width C.
        num_heads: Number of subspaces K (``dim % num_heads == 0``).
        rank: Subspace rank r (``rank * num_heads <= dim``).
        eps: Ridge ε of the Cholesky bases.
        compress_form: ``"full"`` (paper's projector) or ``"diag"`` (reference code's diagonal form).
        projector: ``"ridge"`` (soft projector, the reference's) or ``"exact"``.
        positive_coeffs: Keep α and β positive through softplus of raw parameters.
        coeff_init: Initial effective α and β.
        drop_path: Stochastic depth rate of the residual branch.
        norm_layer: Norm constructor, called as ``norm_layer(dim, device=..., dtype=...)``; default LayerNorm with
            eps 1e-6, the reference's (and PACEViT's) value.
        layer_idx: Block index (enters the sketch seeds).
        sketch_seed: Model-wide sketch seed.
        sketch_schedule: ``"epoch"``, ``"step"``, ``"fixed"`` or ``"reference"``.
        fused: PACEAttention's fused mixer for ridge projectors: True, False, or None (fused except on the CPU).
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
        compress_form: str = "full",
        projector: str = "ridge",
        positive_coeffs: bool = False,
        coeff_init: float = 0.1,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = _REFERENCE_LAYER_NORM,
        layer_idx: int = 0,
        sketch_seed: int = 0,
        sketch_schedule: str = "epoch",
        fused: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        dd = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim, **dd)
        self.attn = PACEAttention(
            dim,
            num_heads,
            rank=rank,
            eps=eps,
            compress_form=compress_form,
            projector=projector,
            positive_coeffs=positive_coeffs,
            coeff_init=coeff_init,
            layer_idx=layer_idx,
            sketch_seed=sketch_seed,
            sketch_schedule=sketch_schedule,
            fused=fused,
            **dd,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def compress_form(self) -> str:
        """The Compress form, ``"full"`` or ``"diag"``."""
        return self.attn.compress_form

    @compress_form.setter
    def compress_form(self, form: str) -> None:
        self.attn.compress_form = form

    def set_compress_form(self, form: str) -> None:
        """Switch the Compress form.

        Args:
            form: ``"full"`` or ``"diag"``.
        """
        self.attn.set_compress_form(form)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the block's sketches for ``epoch`` (per the schedule).

        Args:
            epoch: The new epoch.
        """
        self.attn.set_epoch(epoch)

    def coefficients(self) -> dict[str, Tensor]:
        """Effective α, β and τ of the block, detached.

        Returns:
            ``{"alpha", "beta", "tau"}`` → 0-dim tensors.
        """
        return self.attn.coefficients()

    def memberships(self, x: Tensor) -> Tensor:
        """Memberships π for the block's input (taken after the block's norm).

        Args:
            x: Block input (B, N, C).

        Returns:
            π of shape (B, N, K), summing to 1 over K.
        """
        return self.attn.memberships(self.norm(x))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Tokens (B, N, C).

        Returns:
            Tokens (B, N, C).
        """
        return x + self.drop_path(self.attn(self.norm(x)))
