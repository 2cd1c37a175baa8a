"""Training FLOPs per image, counted by torch (the numerator of the MFU estimate)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def training_flops_per_image(model: nn.Module, img_size: int, device: torch.device) -> float:
    """Forward FLOPs of one image counted by torch's FlopCounterMode, times 3 for forward + backward.

    Args:
        model: the unwrapped model.
        img_size: input resolution.
        device: where to run the counting forward pass.
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    model.train(was_training)
    return 3.0 * counter.get_total_flops()
