"""PACE block: x + DropPath(PACEAttention(norm(x))); pre-norm and no feed-forward network."""

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from pace.layers.pace_attention import PACEAttention

# The reference's LayerNorm eps (1e-6), the default of PACEViT too: one default everywhere.
REFERENCE_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


class PACEBlock(nn.Module):
    """One PACE layer with its pre-norm and stochastic depth.

    The token mixer comes configured: ``attn_layer`` is called as ``attn_layer(dim, num_heads, layer_idx=...,
    device=..., dtype=...)``, so the PACE settings are given once, as ``functools.partial(PACEAttention, rank=...,
    compress_form=..., ...)`` (timm's ``Block(attn_layer=...)``, dinov2's ``block_fn=partial(...)``).

    Args:
        dim: Token width C.
        num_heads: Number of subspaces K (``dim % num_heads == 0``).
        attn_layer: The token mixer's constructor, :class:`pace.layers.PACEAttention` (with its defaults) or a
            partial of it carrying the PACE settings.
        drop_path: Stochastic depth rate of the residual branch.
        norm_layer: Norm constructor, called as ``norm_layer(dim, device=..., dtype=...)``; default LayerNorm with
            eps 1e-6, the reference's (and PACEViT's) value.
        layer_idx: Block index, passed on to ``attn_layer`` (it enters the sketch seeds).
        device: Factory device of the norm and the token mixer.
        dtype: Factory dtype of the norm and the token mixer.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attn_layer: Callable[..., nn.Module] = PACEAttention,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = REFERENCE_LAYER_NORM,
        layer_idx: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        dd = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim, **dd)
        self.attn = attn_layer(dim, num_heads, layer_idx=layer_idx, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

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
        if not isinstance(self.attn, PACEAttention):
            return x + self.drop_path(self.attn(self.norm(x)))
        # x + DropPath(attn(norm(x))), with the norm, the residual and the branch's scales handed to the mixer, which
        # normalises in its first pass and adds the residual in its last product (no pass of their own over
        # (B, N, C)), and adds the residual's gradient in the norm's backward pass.
        return self.attn(x, residual=x, branch_scale=self._branch_scale(x), norm=self.norm)

    def _branch_scale(self, x: Tensor) -> Tensor | None:
        """Per-image scales (B,) of the residual branch, 0 or 1/keep: timm's DropPath applied to ones (the same RNG
        calls, so a seeded run drops the same images); None where it is the identity."""
        if not isinstance(self.drop_path, DropPath) or not self.training:
            return None
        return self.drop_path(x.new_ones((x.shape[0], 1))).view(-1)  # DropPath draws one number per image
