"""Read-only forward passes: evaluation mode, no gradients, full precision, and the model's state left as found."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def is_pace_model(model: nn.Module) -> bool:
    """Whether ``model`` has PACE blocks to analyse (``model.blocks[i].attn.compress``, as PACE-ViT).

    Args:
        model: Any module.

    Returns:
        True for a PACE-ViT, False for other models (such as a softmax-attention baseline) and for wrappers.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return False
    return all(hasattr(getattr(b, "attn", None), "compress") for b in blocks)


def pace_blocks(model: nn.Module) -> nn.ModuleList:
    """The PACE blocks of a PACE-ViT (anything with ``blocks`` whose members carry ``attn.compress``).

    Args:
        model: The unwrapped model (not a DDP or ``torch.compile`` wrapper).

    Returns:
        ``model.blocks``.
    """
    if not is_pace_model(model):
        raise TypeError(
            f"{type(model).__name__} has no PACE blocks (expected model.blocks[i].attn.compress, as in PACE-ViT); "
            "pass the unwrapped model, not a DistributedDataParallel or torch.compile wrapper"
        )
    return model.blocks


def select_blocks(model: nn.Module, blocks: list[int] | None) -> list[int]:
    """Block indices to analyse, checked against the model's depth (negative indices count from the end).

    Args:
        model: A PACE-ViT.
        blocks: Indices, or None for every block.

    Returns:
        Sorted, de-duplicated non-negative indices.
    """
    depth = len(pace_blocks(model))
    if blocks is None:
        return list(range(depth))
    bad = [b for b in blocks if not -depth <= b < depth]
    if bad:
        raise ValueError(f"block indices {bad} are out of range for a model with {depth} PACE blocks")
    return sorted({b % depth for b in blocks})


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def as_batch(images: Tensor, model: nn.Module) -> Tensor:
    """Images as a float32 batch (B, 3, H, W) on the model's device.

    Args:
        images: One image (3, H, W) or a batch (B, 3, H, W), already normalised for the model.
        model: The model the images are for.

    Returns:
        The batch.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W) or (C, H, W), got {tuple(images.shape)}")
    return images.to(device=model_device(model), dtype=torch.float32)


@contextmanager
def analysis_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run forwards that leave no trace on ``model``.

    Inside: every module in evaluation mode (BatchNorm reads its running statistics and does not update them; a
    sketched operator uses its stored or derived sketch and neither overwrites the stored one nor advances its step
    counter), no autograd graph, and autocast off so the measures are computed in float32 even when called inside
    a mixed-precision training step. On exit every module gets back its own train/eval flag (restoring per module
    keeps a submodule that was deliberately left in evaluation mode, such as a frozen norm, as it was).

    Args:
        model: The model.

    Yields:
        The same model.
    """
    flags = [(m, m.training) for m in model.modules()]
    device_type = model_device(model).type
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            yield model
    finally:
        for module, training in flags:
            module.training = training
