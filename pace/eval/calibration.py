"""Calibration of top-1 confidences: expected calibration error over equal-width confidence bins."""

from __future__ import annotations

import torch

ECE_BINS = 15  # the usual choice since Guo et al. 2017, "On Calibration of Modern Neural Networks"


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the sample-weighted mean gap between accuracy and mean confidence over equal-width bins.

    Bin `b` holds the confidences in `(b / bins, (b + 1) / bins]` (bin 0 also takes a confidence of exactly 0).
    Computed in float64 on canonical (key-sorted) predictions, so it does not depend on how samples were split.

    Args:
        confidence: (N,) top-1 softmax probabilities.
        correct: (N,) bool, whether the top-1 class is right.
        bins: the number of bins.

    Returns:
        ECE as a fraction in [0, 1]; NaN for no samples.
    """
    if len(confidence) == 0:
        return float("nan")
    conf = confidence.double()
    hit = correct.double()
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hit)
    return float((conf_sum - hit_sum).abs().sum() / len(conf))
