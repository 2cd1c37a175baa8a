"""PACEAttention: α·Expand(x) − β·Compress(x), the token mixer of a PACE block."""

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import register_notrace_module
from torch import Tensor, nn

from pace.layers._validate import check_sizes
from pace.layers.basis import ridge_project
from pace.layers.compress import Compress, compress, validate_compress_form
from pace.layers.expand import Expand, expand
from pace.layers.mixer import pace_mixer


def softplus_inverse(y: Tensor) -> Tensor:
    """The raw values whose softplus is ``y``: ``log(e^y − 1)``, computed in float64, in the dtype of ``y``.

    Used wherever an effective coefficient becomes a stored raw one (initialisation under ``positive_coeffs``, the
    conversion of the authors' checkpoints); callers check that ``y`` is positive, naming their own argument.

    Args:
        y: Positive values.

    Returns:
        The raw values, of the shape and dtype of ``y``.
    """
    y64 = y.double()
    return (y64 + torch.log(-torch.expm1(-y64))).to(y.dtype)  # log(e^y − 1) without overflow for large y


def pace_attention(
    x: Tensor,
    subspaces: Tensor,
    tau: Tensor,
    alpha: Tensor,
    beta: Tensor,
    expand_sketch: Tensor,
    compress_sketch: Tensor,
    *,
    num_heads: int,
    eps: float,
    exact: bool = False,
    form: str = "full",
    fused: bool | None = None,
    residual: Tensor | None = None,
    branch_scale: Tensor | None = None,
    layer_norm: tuple[Tensor, Tensor, float] | None = None,
    memberships: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``α·expand(x) − β·compress(x)`` and the memberships π, with the two terms sharing their work.

    The same function as the separate operators (:func:`pace.layers.expand`, :func:`pace.layers.compress`). With
    ridge projectors and ``fused`` it runs :func:`pace.layers.mixer.pace_mixer`: one autograd function sharing
    the sketch product, the U products and the small factors between the operators, with a hand-written backward;
    it moves about a quarter of their bytes in a third of their kernels, with about 2 % more matrix FLOPs at ViT-S
    sizes (its membership kernels recompute c_k = a_kQ_k), but its small ops run as PyTorch fallbacks where Triton
    does not (on one CPU thread, an S block's step took 1.12× the separate operators' time). ``fused=None``
    therefore picks it where memory traffic dominates (any device but the CPU) and the separate operators on the
    CPU.
    Otherwise (exact projectors, or ``fused=False``) the operators run separately, with α
    folded into the expansion's small basis and −β into ``U``, and the compression's last product ``w Uᵀ``
    accumulated onto the expansion term in one ``addmm``.

    Args:
        x: Tokens, shape (B, N, C) (already normalised, unless ``layer_norm`` is given).
        subspaces: ``U``, shape (C, C).
        tau: Temperature τ, a 0-dim tensor.
        alpha: Effective α, a 0-dim tensor.
        beta: Effective β, a 0-dim tensor.
        expand_sketch: Ω_e, shape (N, r·K).
        compress_sketch: Ω_c, shape (N, r).
        num_heads: K.
        eps: Ridge ε of both bases.
        exact: Use exact (orthogonal) projectors instead of the ridge ones.
        form: Compress form, ``"full"`` or ``"diag"``.
        fused: Use the fused mixer for ridge projectors: True, False, or None (fused except on the CPU).
        residual: Optional tokens to add the update to (the block's input): the first output is then
            ``residual + t_b·update``, which the fused mixer adds in its last product's epilogue.
        branch_scale: Optional per-image scales ``t`` of the update, shape (B,) (stochastic depth); needs
            ``residual``.
        layer_norm: Optional ``(weight, bias, eps)`` of a LayerNorm over C to apply to x first (the block's
            pre-norm): the fused mixer runs it as its first pass and, with ``residual`` x itself, adds the
            residual's cotangent in the norm's backward pass.
        memberships: Return π (else None: the fused mixer then does not output it, and a compiled graph writes no
            zero cotangent for it).

    Returns:
        ``(update, memberships)``: update of shape (B, N, C) in the dtype of ``x`` (or ``residual + t_b·update``);
        memberships π of shape (B, N, K) in the dtype of ``x`` (None with ``memberships=False``).
    """
    if branch_scale is not None and residual is None:
        raise ValueError("pace_attention: branch_scale scales the update added to a residual; pass residual too")
    if _runs_fused(fused, exact, x):
        validate_compress_form(form)
        out, pi = pace_mixer(
            x, subspaces, tau, alpha, beta, expand_sketch, compress_sketch, num_heads=num_heads, eps=eps, form=form,
            residual=residual, branch_scale=branch_scale, layer_norm=layer_norm, memberships=memberships,
        )  # fmt: skip
        return out, None if pi is None else pi.to(x.dtype)
    if layer_norm is not None:
        weight, bias, norm_eps = layer_norm
        x = F.layer_norm(x, x.shape[-1:], weight, bias, norm_eps)
    if exact:
        expanded = alpha * expand(x, expand_sketch, eps=eps, exact=True)
    else:
        expanded = ridge_project(x, expand_sketch, eps=eps, complement=True, scale=alpha)  # α(x − xΠ)
    # −β and the expansion term folded into the compression's last product: one addmm.
    out, pi = compress(
        x,
        subspaces,
        tau,
        compress_sketch,
        num_heads=num_heads,
        eps=eps,
        exact=exact,
        form=form,
        scale=-beta,
        add_to=expanded,
    )
    if residual is not None:  # as x + DropPath(update): the update times its image's scale, then the sum
        out = residual + (out if branch_scale is None else out * branch_scale.to(out.dtype).view(-1, 1, 1))
    return out, pi if memberships else None


def _runs_fused(fused: bool | None, exact: bool, x: Tensor) -> bool:
    # The fused mixer: ridge projectors, and fused=True, or fused=None on any device but the CPU.
    return not exact and (x.device.type != "cpu" if fused is None else fused)


def _plain_layer_norm(norm: nn.Module, dim: int) -> bool:
    # Exactly these classes: subclasses may normalise other axes (timm's LayerNorm2d normalises channels first).
    plain = type(norm) in (nn.LayerNorm, TimmLayerNorm) and tuple(norm.normalized_shape) == (dim,)
    return plain and norm.weight is not None and norm.bias is not None


# A leaf for torch.fx / timm feature extraction: its forward manages the operators' sketches in Python.
@register_notrace_module
class PACEAttention(nn.Module):
    """Expansion minus compression with learnable step sizes α and β (one scalar each).

    Its keywords are the PACE settings, declared here only, with the reference network's defaults. A model
    configures them once (``functools.partial(PACEAttention, rank=..., ...)``) and hands that to every
    :class:`pace.layers.PACEBlock` as its ``attn_layer``, which adds the block index (timm's ``Block(attn_layer=)``,
    dinov2's ``block_fn=partial(...)``).

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
        sketch_schedule: When sketches are redrawn: ``"epoch"``, ``"step"``, ``"fixed"`` or ``"reference"`` (see
            :class:`pace.layers.SketchedModule`).
        fused: Run the fused mixer (:func:`pace.layers.mixer.pace_mixer`) for ridge projectors; ``False`` keeps
            the separate operators (same function, more memory traffic, fewer FLOPs); ``None`` picks the fused
            mixer on every device but the CPU (see :func:`pace_attention`).
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
        fused: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(dim, num_heads, rank, eps)
        self.fused = fused
        dd = {"device": device, "dtype": dtype}
        sketch = {"layer_idx": layer_idx, "sketch_seed": sketch_seed, "sketch_schedule": sketch_schedule, **dd}
        self.positive_coeffs = positive_coeffs
        self.coeff_init = coeff_init
        self._raw_init = coeff_init
        if positive_coeffs:
            if not coeff_init > 0:
                raise ValueError(f"positive_coeffs needs a positive coeff_init, got {coeff_init}")
            # On the CPU whatever the default device: a host number (under a meta device context too).
            self._raw_init = softplus_inverse(torch.tensor(coeff_init, dtype=torch.float64, device="cpu")).item()
        self.expand = Expand(dim, num_heads, rank=rank, eps=eps, projector=projector, **sketch)
        self.compress = Compress(dim, num_heads, rank=rank, eps=eps, projector=projector, form=compress_form, **sketch)
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
        """The Compress form, ``"full"`` or ``"diag"``; assign to switch it (the one switch, checked by Compress)."""
        return self.compress.form

    @compress_form.setter
    def compress_form(self, form: str) -> None:
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

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None = None,
        branch_scale: Tensor | None = None,
        norm: nn.Module | None = None,
    ) -> Tensor:
        """Apply α·Expand(x) − β·Compress(x), optionally to ``norm(x)`` and added to a residual.

        Args:
            x: Tokens (B, N, C) (already normalised, unless ``norm`` is given).
            residual: Optional tokens (B, N, C) to add the update to; :class:`pace.layers.PACEBlock` passes its input
                so that the fused mixer adds it in its last product instead of a pass of its own.
            branch_scale: Optional per-image scales (B,) of the update (stochastic depth), with ``residual``.
            norm: Optional norm to apply to x first (the block's pre-norm). Where the fused mixer runs, a LayerNorm
                over C with weight and bias (``nn.LayerNorm``, timm's ``LayerNorm``) runs inside it, as its first
                pass (the module's forward and its hooks are not called); otherwise the module is called here.

        Returns:
            The update, shape (B, N, C), or ``residual + branch_scale·update``.
        """
        layer_norm = None
        if (
            norm is not None
            and _runs_fused(self.fused, self.compress.exact, x)
            and _plain_layer_norm(norm, x.shape[-1])
        ):
            layer_norm = (norm.weight, norm.bias, norm.eps)
        elif norm is not None:
            x = norm(x)
        n = x.shape[1]
        return pace_attention(
            x,
            self.compress.subspaces,
            self.compress.tau,
            self._effective(self.alpha),
            self._effective(self.beta),
            self.expand.current_sketch(n),
            self.compress.current_sketch(n),
            num_heads=self.compress.num_heads,
            eps=self.compress.eps,
            exact=self.compress.exact,
            form=self.compress.form,
            fused=self.fused,
            residual=residual,
            branch_scale=branch_scale,
            layer_norm=layer_norm,
            memberships=False,
        )[0]
