"""PACEAttention primitives, one per file."""

from pace.layers.basis import PROJECTORS, ridge_basis, ridge_project
from pace.layers.compress import COMPRESS_FORMS, Compress, compress
from pace.layers.expand import Expand, expand
from pace.layers.mcr2 import coding_rate, compression_rate, rate_reduction
from pace.layers.pace_attention import PACEAttention, pace_attention, softplus_inverse
from pace.layers.pace_block import REFERENCE_LAYER_NORM, PACEBlock
from pace.layers.sketch import (
    EVAL_SKETCHES,
    SKETCH_SCHEDULES,
    SketchedModule,
    derive_sketch_seed,
    gaussian_sketch,
    reseed_sketches,
    set_eval_sketch,
    sync_sketches,
)
from pace.layers.stem import ConvStem

__all__ = [
    "COMPRESS_FORMS",
    "EVAL_SKETCHES",
    "PROJECTORS",
    "REFERENCE_LAYER_NORM",
    "SKETCH_SCHEDULES",
    "Compress",
    "ConvStem",
    "Expand",
    "PACEAttention",
    "PACEBlock",
    "SketchedModule",
    "coding_rate",
    "compress",
    "compression_rate",
    "derive_sketch_seed",
    "expand",
    "gaussian_sketch",
    "pace_attention",
    "rate_reduction",
    "reseed_sketches",
    "ridge_basis",
    "ridge_project",
    "set_eval_sketch",
    "softplus_inverse",
    "sync_sketches",
]
