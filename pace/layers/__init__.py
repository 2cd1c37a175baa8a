"""PACEAttention primitives, one per file."""

from pace.layers.basis import PROJECTORS, ridge_basis
from pace.layers.compress import COMPRESS_FORMS, Compress, compress
from pace.layers.expand import Expand, expand
from pace.layers.mcr2 import coding_rate, compression_rate, rate_reduction
from pace.layers.pace_attention import PACEAttention
from pace.layers.pace_block import PACEBlock
from pace.layers.sketch import SKETCH_SCHEDULES, SketchedModule, derive_sketch_seed, gaussian_sketch
from pace.layers.stem import ConvStem

__all__ = [
    "COMPRESS_FORMS",
    "PROJECTORS",
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
    "rate_reduction",
    "ridge_basis",
]
