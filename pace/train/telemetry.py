"""PACE telemetry: each block's coefficients and coding rates on a few fixed held-out images during training."""

from __future__ import annotations

import torch
from torch import nn

from pace.analysis import is_pace_model, layer_telemetry


def pace_telemetry(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Each PACE block's alpha, beta, tau and the coding rates R, R_c, dR of `images`' tokens, as
    `pace/block<i>/<name>` (`pace.analysis.layer_telemetry`, a read-only forward); empty for other models.

    Args:
        model: the unwrapped model.
        images: a few normalised held-out images (B, 3, H, W).
    """
    return layer_telemetry(model, images) if is_pace_model(model) else {}
