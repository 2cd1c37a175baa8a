"""PACE-ViT backbones, registered with timm when this package is imported."""
