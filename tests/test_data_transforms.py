"""timm transform wrappers: eval geometry, train output, RandAugment posterize at full magnitude, Mixup."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from pace.data import create_eval_transform, create_mixup, create_train_transform


def _image(width=300, height=200, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_eval_transform_is_resize_centre_crop_normalise():
    image = _image()
    reference = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )
    torch.testing.assert_close(create_eval_transform(input_size=224, crop_pct=0.875)(image), reference(image))


def test_train_transform_output_and_uint8_mode():
    out = create_train_transform(input_size=32)(_image())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    raw = create_train_transform(input_size=32, normalize=False)(_image())
    assert raw.shape == (3, 32, 32) and raw.dtype == torch.uint8


def test_randaugment_posterize_at_full_magnitude_does_not_raise():
    # Magnitude 10 with the `inc1` ops makes posterize keep 0 bits, which Pillow >= 12 refuses.
    transform = create_train_transform(input_size=16, auto_augment="rand-m10-n2-inc1", re_prob=0.0)
    random.seed(0)
    np.random.seed(0)
    for seed in range(150):
        transform(_image(24, 24, seed))
    posterize = next(op for op in transform.transforms[2].ops if op.name == "PosterizeIncreasing")
    assert np.asarray(posterize.aug_fn(_image(8, 8), 0)).max() == 0
    assert np.array_equal(np.asarray(posterize.aug_fn(_image(8, 8), 2)), np.asarray(_image(8, 8)) & 0b11000000)


def test_mixup_makes_soft_targets_and_can_be_off():
    assert create_mixup(num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0) is None
    mixup = create_mixup(num_classes=5, label_smoothing=0.0)
    images, targets = mixup(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
