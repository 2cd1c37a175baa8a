"""PACEAttention: α·Expand(x) − β·Compress(x), the token mixer of a PACE block."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pace.layers._validate import check_sizes
from pace.layers.compress import Compress
from pace.layers.expand import Expand


def softplus_inverse(value: float) -> float:
    """Raw value whose softplus is ``value``, i.e. log(e^v − 1), computed in Python (no tensor work).

    Args:
        value: A positive number.

    Returns:
        The raw parameter value.
    """
    if not value > 0:
        raise ValueError(f"positive_coeffs needs a positive coeff_init, got {value}")
    return value + math.log(-math.expm1(-value))  # log(e^v − 1) without overflow for large v


class PACEAttention(nn.Module):
    """Expansion minus compression with learnable step sizes α and β (one scalar each).

    Args:
        dim: Token width C.
        num_heads: Number of subspaces K.
        rank: Subspace rank r (``rank * num_heads <= dim``).
        eps: Ridge ε of both bases.
        compress_form: ``"full"`` (paper) or ``"diag"`` (reference code).
        projector: ``"ridge"`` or ``"exact"``.
        positive_coeffs: Store α and β as raw values whose softplus is the coefficient.
        coeff_init: Initial effective α and β.
        layer_idx: Block index (enters the sketch seeds).
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
        compress_form: str = "full",
        projector: str = "ridge",
        positive_coeffs: bool = False,
        coeff_init: float = 0.1,
        layer_idx: int = 0,
        sketch_seed: int = 0,
        sketch_schedule: str = "epoch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(dim, num_heads, rank, eps)
        dd = {"device": device, "dtype": dtype}
        sketch_kw = {"layer_idx": layer_idx, "sketch_seed": sketch_seed, "sketch_schedule": sketch_schedule}
        self.positive_coeffs = positive_coeffs
        self.coeff_init = coeff_init
        self._raw_init = softplus_inverse(coeff_init) if positive_coeffs else coeff_init
        self.expand = Expand(dim, num_heads, rank=rank, eps=eps, projector=projector, **sketch_kw, **dd)
        self.compress = Compress(
            dim, num_heads, rank=rank, eps=eps, projector=projector, form=compress_form, **sketch_kw, **dd
        )
        self.alpha = nn.Parameter(torch.empty((), **dd))
        self.beta = nn.Parameter(torch.empty((), **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """α and β back to ``coeff_init`` (as raw values under ``positive_coeffs``)."""
        nn.init.constant_(self.alpha, self._raw_init)
        nn.init.constant_(self.beta, self._raw_init)

    def _effective(self, raw: Tensor) -> Tensor:
        return F.softplus(raw) if self.positive_coeffs else raw

    @property
    def compress_form(self) -> str:
        """The Compress form, ``"full"`` or ``"diag"``."""
        return self.compress.form

    @compress_form.setter
    def compress_form(self, form: str) -> None:
        self.compress.form = form

    def set_compress_form(self, form: str) -> None:
        """Switch the Compress form.

        Args:
            form: ``"full"`` or ``"diag"``.
        """
        self.compress.form = form

    def set_epoch(self, epoch: int) -> None:
        """Redraw both sketches for ``epoch`` (per the schedule).

        Args:
            epoch: The new epoch.
        """
        self.expand.set_epoch(epoch)
        self.compress.set_epoch(epoch)

    def coefficients(self) -> dict[str, Tensor]:
        """Effective α, β and τ, detached (for logging).

        Returns:
            ``{"alpha", "beta", "tau"}`` → 0-dim tensors.
        """
        return {
            "alpha": self._effective(self.alpha).detach(),
            "beta": self._effective(self.beta).detach(),
            "tau": self.compress.tau.detach(),
        }

    def memberships(self, x: Tensor) -> Tensor:
        """Memberships π of every token in the K subspaces.

        Args:
            x: Tokens (B, N, C) (already normalised).

        Returns:
            π of shape (B, N, K), summing to 1 over K.
        """
        return self.compress.forward_with_memberships(x)[1]

    def forward(self, x: Tensor) -> Tensor:
        """Apply α·Expand(x) − β·Compress(x).

        Args:
            x: Tokens (B, N, C) (already normalised).

        Returns:
            The update, shape (B, N, C).
        """
        out = self._effective(self.alpha) * self.expand(x) - self._effective(self.beta) * self.compress(x)
        return out.to(x.dtype)
