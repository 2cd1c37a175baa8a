"""Per-layer white-box measures of a PACE-ViT: α, β, τ; R, R_c and ΔR of the tokens; their covariance spectrum.

R(Z) and R_c(Z | U) come from :mod:`pace.layers.mcr2`. The tokens of block ``i`` are its output (the residual
stream after the block), measured against that block's own subspaces ``U = blocks[i].attn.compress.subspaces``
and head count; ε is the coding precision of the MCR² objective (paper §1), not the ridge ε of the bases.
"""

import torch
from torch import Tensor, nn

from pace.analysis.inference import analysis_mode, as_batch, pace_blocks, select_blocks
from pace.layers.mcr2 import coding_rate, compression_rate

# Coding precision ε of R and R_c used when none is given (the value of the toy verification, scripts/toy_mcr2.py).
DEFAULT_CODING_EPS = 0.5
# What layer_telemetry reports per block, as `{prefix}/block{i}/{key}`.
TELEMETRY_KEYS = ("alpha", "beta", "tau", "R", "Rc", "dR")


def block_coefficients(model: nn.Module) -> list[dict[str, float]]:
    """Effective α, β and τ of every PACE block (after softplus for a ``positive_coeffs`` model).

    Args:
        model: A PACE-ViT.

    Returns:
        One ``{"alpha", "beta", "tau"}`` dict of floats per block, in order.
    """
    return [{k: float(v) for k, v in blk.coefficients().items()} for blk in pace_blocks(model)]


def block_outputs(model: nn.Module, images: Tensor, *, blocks: list[int] | None = None) -> dict[int, Tensor]:
    """Tokens after each chosen block, from one read-only forward (:func:`analysis_mode`).

    Args:
        model: A PACE-ViT.
        images: Normalised images (B, 3, H, W).
        blocks: Block indices (negative counts from the end); None for every block.

    Returns:
        Block index → tokens (B, N, C), float32, on the model's device.
    """
    chosen = select_blocks(model, blocks)
    images = as_batch(images, model)
    with analysis_mode(model):
        tokens = model.forward_intermediates(
            images, indices=chosen, output_fmt="NLC", intermediates_only=True, stop_early=True
        )  # one (B, N, C) per chosen block
    return dict(zip(chosen, tokens, strict=True))


def token_rates(model: nn.Module, tokens: dict[int, Tensor], *, eps: float = DEFAULT_CODING_EPS) -> dict[int, dict]:
    """R, R_c and ΔR per image of each block's tokens, against that block's subspaces.

    Args:
        model: The PACE-ViT the tokens came from.
        tokens: Block index → tokens (B, N, C), as :func:`block_outputs` returns.
        eps: Coding precision ε.

    Returns:
        Block index → ``{"R", "Rc", "dR"}``, each a float64 tensor (B,).
    """
    if not eps > 0:
        raise ValueError(f"coding precision eps must be positive, got {eps}")
    blocks = pace_blocks(model)
    out = {}
    with torch.no_grad():
        for i, Z in tokens.items():
            compress = blocks[i].attn.compress
            R = coding_rate(Z, eps)
            Rc = compression_rate(Z, compress.subspaces, compress.num_heads, eps)
            out[i] = {"R": R, "Rc": Rc, "dR": R - Rc}
    return out


def layer_rates(
    model: nn.Module, images: Tensor, *, eps: float = DEFAULT_CODING_EPS, blocks: list[int] | None = None
) -> dict[int, dict]:
    """R, R_c and ΔR per image of the tokens after each chosen block (:func:`block_outputs`, :func:`token_rates`).

    Args:
        model: A PACE-ViT.
        images: Normalised images (B, 3, H, W).
        eps: Coding precision ε.
        blocks: Block indices; None for every block.

    Returns:
        Block index → ``{"R", "Rc", "dR"}``, each a float64 tensor (B,).
    """
    return token_rates(model, block_outputs(model, images, blocks=blocks), eps=eps)


def covariance_spectrum(tokens: Tensor) -> Tensor:
    """Eigenvalues of each image's token covariance (C × C), averaged over images, largest first.

    Args:
        tokens: (B, N, C).

    Returns:
        (C,) float64.
    """
    Z = tokens.to(torch.float64)
    Z = Z - Z.mean(dim=1, keepdim=True)  # centre each image's tokens
    cov = Z.mT @ Z / Z.shape[1]  # (B, C, C)
    return torch.linalg.eigvalsh(cov).clamp_min(0).mean(0).flip(0)


def effective_rank(eigenvalues: Tensor) -> float:
    """exp of the entropy of the normalised spectrum (Roy & Vetterli 2007): C for a flat spectrum, 1 for rank one.

    Args:
        eigenvalues: Non-negative eigenvalues (C,).

    Returns:
        The effective rank (0 for an all-zero spectrum).
    """
    total = eigenvalues.sum()
    if total <= 0:
        return 0.0
    p = eigenvalues[eigenvalues > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def layer_telemetry(
    model: nn.Module,
    images: Tensor,
    *,
    eps: float = DEFAULT_CODING_EPS,
    blocks: list[int] | None = None,
    prefix: str = "pace",
) -> dict[str, float]:
    """Cheap per-block numbers for training logs: ``{prefix}/block{i}/{alpha,beta,tau,R,Rc,dR}``.

    R, R_c and ΔR are batch means over ``images``. The forward is read-only (:func:`analysis_mode`): the model's
    train/eval flags, BatchNorm running statistics, stored sketches and sketch step counters, parameters and
    gradients, and the global RNG state are as before the call. Meant for a few fixed images every N steps on one
    rank; on a GPU it reads the numbers back in one copy.

    Args:
        model: The unwrapped PACE-ViT being trained.
        images: A few normalised images (B, 3, H, W) (any device; moved to the model's).
        eps: Coding precision ε.
        blocks: Block indices; None for every block.
        prefix: Key prefix.

    Returns:
        Metric name → value.
    """
    chosen = select_blocks(model, blocks)
    pace = pace_blocks(model)
    rates = layer_rates(model, images, eps=eps, blocks=chosen)
    names, values = [], []
    for i in chosen:
        per_block = {**pace[i].coefficients(), **{k: v.mean() for k, v in rates[i].items()}}
        for name in TELEMETRY_KEYS:
            names.append(f"{prefix}/block{i}/{name}")
            values.append(per_block[name].detach().to(torch.float64))
    return dict(zip(names, torch.stack(values).tolist()))  # one device-to-host copy for all the numbers
