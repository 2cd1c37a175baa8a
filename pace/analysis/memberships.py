"""Subspace memberships π as image-sized maps: per-head heat maps and the argmax-head segmentation."""

import torch.nn.functional as F
from torch import Tensor, nn

from pace.analysis.inference import analysis_mode, as_batch, select_blocks

INTERPOLATIONS = ("bilinear", "nearest")


def membership_maps(
    model: nn.Module,
    images: Tensor,
    *,
    blocks: list[int] | None = None,
    size: tuple[int, int] | None = None,
    interpolation: str = "bilinear",
) -> dict[int, Tensor]:
    """Memberships π of every token in each head's subspace, for chosen blocks, upsampled to the image.

    π is taken from the block's normalised input, as the block's Compress operator sees it
    (``PACEViT.forward_memberships``), in a read-only forward (:func:`analysis_mode`).

    Args:
        model: A PACE-ViT (unwrapped).
        images: Normalised images (B, 3, H, W) or one image (3, H, W).
        blocks: Block indices (negative counts from the end); None for every block.
        size: Output size (H, W); None for the images' size.
        interpolation: ``"bilinear"`` or ``"nearest"``. Both weight neighbouring tokens by non-negative weights
            that sum to one, so the upsampled maps still sum to 1 over heads at every pixel (bicubic would not).

    Returns:
        Block index → π maps of shape (B, K, H, W), float32 on the CPU.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    chosen = select_blocks(model, blocks)
    images = as_batch(images, model)
    size = tuple(size) if size is not None else tuple(images.shape[-2:])
    with analysis_mode(model):
        maps = model.forward_memberships(images)  # one (B, K, H', W') per block
    kwargs = {"align_corners": False} if interpolation == "bilinear" else {}
    return {i: F.interpolate(maps[i].float(), size=size, mode=interpolation, **kwargs).cpu() for i in chosen}


def segmentation(maps: Tensor) -> Tensor:
    """The head with the largest membership at every pixel.

    Args:
        maps: π maps (B, K, H, W) or (K, H, W).

    Returns:
        Head indices, shape (B, H, W) or (H, W), int64.
    """
    return maps.argmax(dim=-3)
