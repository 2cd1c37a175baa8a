"""White-box analysis of PACE-ViT: memberships, per-layer coefficients and coding rates, spectra, plots.

Plotting lives in :mod:`pace.analysis.plots` (imported on demand, it loads matplotlib); the scripts load models
with :func:`pace.eval.load_model`; image handling is in :mod:`pace.analysis.images`.
"""

from pace.analysis.inference import analysis_mode, is_pace_model
from pace.analysis.memberships import membership_maps, segmentation
from pace.analysis.rates import (
    DEFAULT_CODING_EPS,
    TELEMETRY_KEYS,
    block_coefficients,
    block_outputs,
    covariance_spectrum,
    effective_rank,
    layer_rates,
    layer_telemetry,
    token_rates,
)

__all__ = [
    "DEFAULT_CODING_EPS",
    "TELEMETRY_KEYS",
    "analysis_mode",
    "block_coefficients",
    "block_outputs",
    "covariance_spectrum",
    "effective_rank",
    "is_pace_model",
    "layer_rates",
    "layer_telemetry",
    "membership_maps",
    "segmentation",
    "token_rates",
]
