"""PACE-ViT backbones, registered with timm when this package is imported."""

from pace.models import variants  # noqa: F401  (registers the variants with timm)
from pace.models.checkpoint_filter import checkpoint_filter_fn
from pace.models.pace_vit import PACEViT
from pace.models.regional import compile_blocks

__all__ = ["PACEViT", "checkpoint_filter_fn", "compile_blocks"]
