"""timm's image transforms and Mixup/CutMix behind typed keyword arguments."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import RandAugment


def create_train_transform(
    *,
    input_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    normalize: bool = True,
) -> Callable:
    """RandomResizedCrop + flip + RandAugment (or colour jitter) + normalise + random erasing, via timm.

    The defaults are the DeiT/timm ImageNet recipe.

    Args:
        input_size: output side in pixels.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: horizontal flip probability.
        color_jitter: colour jitter strength (timm ignores it when auto_augment is set); None: off.
        auto_augment: timm auto-augment spec such as `rand-m9-mstd0.5-inc1`; None: off.
        interpolation: resize interpolation (`bicubic`, `bilinear`, `random`).
        re_prob: random erasing probability.
        re_mode: random erasing fill (`pixel`, `rand`, `const`).
        re_count: random erasing regions.
        mean: normalisation mean.
        std: normalisation std.
        normalize: False returns uint8 tensors (normalise on the GPU instead).
    """
    transform = create_transform(
        input_size,
        is_training=True,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation=interpolation,
        re_prob=re_prob if normalize else 0.0,
        re_mode=re_mode,
        re_count=re_count,
        mean=mean,
        std=std,
        normalize=normalize,
    )
    _allow_zero_bit_posterize(transform)
    return transform


def create_eval_transform(
    *,
    input_size: int | tuple[int, int, int] = 224,
    crop_pct: float = 0.875,
    crop_mode: str | None = None,
    interpolation: str = "bicubic",
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    normalize: bool = True,
) -> Callable:
    """Resize the shorter side to input_size / crop_pct, centre crop input_size, normalise, via timm.

    The keywords are those of a resolved timm data config, so `create_eval_transform(**eval_data_config(model))`
    (`pace.eval.transform`) is a model's eval transform, the one the Trainer, pace-eval and the analysis scripts use.

    Args:
        input_size: output side in pixels, or timm's (C, H, W).
        crop_pct: centre-crop fraction (0.875: resize to 256 for a 224 crop).
        crop_mode: timm crop mode (`center`, `squash`, `border`; None: `center`).
        interpolation: resize interpolation.
        mean: normalisation mean.
        std: normalisation std.
        normalize: False returns uint8 tensors.
    """
    return create_transform(
        input_size,
        is_training=False,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        interpolation=interpolation,
        mean=mean,
        std=std,
        normalize=normalize,
    )


def create_mixup(
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    label_smoothing: float = 0.1,
) -> Mixup | None:
    """timm's batch-level Mixup/CutMix (targets become soft, shape (B, num_classes)); None when both alphas are 0.

    Pass it to `create_train_loader(batch_transform=...)` to make it part of the deterministic, resumable epoch,
    or call it in the training step on the device.

    Args:
        num_classes: classes of the soft targets.
        mixup_alpha: Beta(alpha, alpha) of the Mixup weight; 0: no Mixup.
        cutmix_alpha: Beta(alpha, alpha) of the CutMix area; 0: no CutMix.
        prob: probability of mixing a batch.
        switch_prob: probability of CutMix instead of Mixup when both are on.
        mode: `batch`, `pair` or `elem` (how often the parameters are drawn).
        label_smoothing: smoothing of the mixed targets.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for 0 bits (a black image), which Pillow >= 12 refuses."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


def _allow_zero_bit_posterize(transform: Callable) -> None:
    """RandAugment's `inc1` posterize keeps 0 bits at magnitude 10, which `mstd` noise reaches for about 2% of
    its draws; with Pillow >= 12 that raises mid-epoch. Swap in a posterize that keeps timm's meaning."""
    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
