"""Test-time augmentation: the mean of a model's logits over an image and its horizontal mirror."""

from __future__ import annotations

import torch
from torch import nn


class FlipTTA(nn.Module):
    """Wrap a classifier so that it returns the mean of its logits on the image and on its mirror image.

    Args:
        model: any classifier returning (B, num_classes) logits.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Both views in one batch: (2B, C, H, W) -> (2, B, num_classes) -> mean over the views.
        logits = self.model(torch.cat([images, images.flip(-1)]))
        return logits.reshape(2, images.shape[0], -1).mean(dim=0)
