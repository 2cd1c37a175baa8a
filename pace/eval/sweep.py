"""Evaluation over several resolutions and crop fractions in one run: the transform of each point and its name in
the combined results table."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any


def transform_points(
    base: Mapping[str, Any], input_sizes: Sequence[int], crop_pcts: Sequence[float]
) -> list[dict[str, Any]]:
    """The transform overrides of every (resolution, crop fraction) pair, resolutions outermost.

    Args:
        base: the run's transform overrides (`transform` in the config).
        input_sizes: resolutions to evaluate at; empty keeps `base`'s.
        crop_pcts: crop fractions to evaluate at; empty keeps `base`'s.
    """
    sizes = list(input_sizes) or [base.get("input_size")]
    crops = list(crop_pcts) or [base.get("crop_pct")]
    return [{**base, "input_size": size, "crop_pct": crop} for size, crop in itertools.product(sizes, crops)]


def point_name(evaluator: str, data_config: Mapping[str, Any]) -> str:
    """An evaluator's row name at one point, e.g. `val@224px/crop0.875`."""
    return f"{evaluator}@{data_config['input_size'][-1]}px/crop{data_config['crop_pct']:g}"
