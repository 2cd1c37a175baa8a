"""PACE-ViT variants, registered with timm: a ``default_cfgs`` table and one thin entrypoint per variant.

Registration runs when :mod:`pace.models` is imported (``import pace`` does it).
"""

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from pace.models.checkpoint_filter import checkpoint_filter_fn
from pace.models.pace_vit import PACEViT


def _create_pace_vit(variant: str, pretrained: bool = False, **kwargs) -> PACEViT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        PACEViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0.0",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "pace_vit_test": _cfg(input_size=(3, 64, 64)),
        "pace_vit_tiny_patch4_32": _cfg(
            input_size=(3, 32, 32),
            num_classes=10,
            crop_pct=1.0,
            mean=(0.4914, 0.4822, 0.4465),  # CIFAR-10
            std=(0.2470, 0.2435, 0.2616),
        ),
        "pace_vit_tiny_patch8_224": _cfg(),
        "pace_vit_small_patch8_224": _cfg(),
        "pace_vit_tiny_patch16_224": _cfg(),
        "pace_vit_small_patch16_224": _cfg(),
        "pace_vit_medium_patch16_224": _cfg(),
        "pace_vit_large_patch16_224": _cfg(),
    }
)


@register_model
def pace_vit_test(pretrained: bool = False, **kwargs) -> PACEViT:
    """Tiny PACE-ViT for tests (64 px, patch 8, d 64, 4 blocks, 2 subspaces of rank 8)."""
    model_args = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "rank": 8}
    return _create_pace_vit("pace_vit_test", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Tiny for 32 px images (CIFAR): patch 4, 8x8 tokens."""
    model_args = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 4}
    return _create_pace_vit("pace_vit_tiny_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_tiny_patch8_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Tiny/8 (d 192, 12 blocks, 4 subspaces)."""
    model_args = {"patch_size": 8, "embed_dim": 192, "depth": 12, "num_heads": 4}
    return _create_pace_vit("pace_vit_tiny_patch8_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_small_patch8_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Small/8 (d 384, 12 blocks, 8 subspaces)."""
    model_args = {"patch_size": 8, "embed_dim": 384, "depth": 12, "num_heads": 8}
    return _create_pace_vit("pace_vit_small_patch8_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Tiny/16 (d 192, 12 blocks, 4 subspaces; reference ECAttention_tiny_layer12_p16)."""
    model_args = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 4}
    return _create_pace_vit("pace_vit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Small/16 (d 384, 12 blocks, 8 subspaces; reference ECAttention_small_layer12_p16)."""
    model_args = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 8}
    return _create_pace_vit("pace_vit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_medium_patch16_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Medium/16 (d 512, 24 blocks, 8 subspaces; reference ECAttention_medium_layer24_p16)."""
    model_args = {"patch_size": 16, "embed_dim": 512, "depth": 24, "num_heads": 8}
    return _create_pace_vit("pace_vit_medium_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Large/16 (d 1024, 24 blocks, 16 subspaces; reference ECAttention_large_layer24_p16_d1024)."""
    model_args = {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
    return _create_pace_vit("pace_vit_large_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
