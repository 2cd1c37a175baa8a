"""PACE telemetry: each block's coefficients and coding rates on a few fixed held-out images during training."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pace.analysis import is_pace_model, layer_telemetry
from pace.train.checkpoint import rng_state, set_rng_state


def pace_telemetry(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Each PACE block's alpha, beta, tau and the coding rates R, R_c, dR of `images`' tokens, as
    `pace/block<i>/<name>` (`pace.analysis.layer_telemetry`, a read-only forward); empty for other models.

    Args:
        model: the unwrapped model.
        images: a few normalised held-out images (B, 3, H, W).
    """
    return layer_telemetry(model, images) if is_pace_model(model) else {}


def first_images(loader: Iterable, count: int) -> torch.Tensor:
    """The first `count` images of an evaluation loader, read without moving the global random generators.

    A loader may draw seeds from the global generators, so their states are restored: training stays bit-identical
    with or without telemetry.

    Args:
        loader: yields batches whose first element is the images (B, 3, H, W).
        count: images to keep.
    """
    state = rng_state()
    images = next(iter(loader))[0][:count]
    set_rng_state(state)
    return images
