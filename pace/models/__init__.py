"""PACE-ViT backbones, registered with timm when this package is imported."""

from pace.models.pace_vit import PACEViT, checkpoint_filter_fn

__all__ = ["PACEViT", "checkpoint_filter_fn"]
