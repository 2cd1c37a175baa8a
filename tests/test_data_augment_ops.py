"""The draft path's RandAugment on one uint8 tensor (`apply_recorded`): shears and translations as a 1-D bicubic
filter per line (`shift_lines`) against Pillow's affine transform, and whole RandAugment draws against timm's own
Pillow RandAugment under the same seed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_device import encoded, seed_all, smooth_jpeg
from timm.data import auto_augment

from pace.data import create_device_train_transform, create_train_transform
from pace.data.augment_ops import apply_recorded, chw_to_pil, pil_to_chw
from pace.data.augment_params import ParamSampler
from pace.data.device_stage import BatchBuffers
from pace.data.transforms import _posterize

FILL = (124, 116, 104)


def noisy_picture(seed: int, size: tuple[int, int] = (48, 37)) -> Image.Image:
    """Half white noise, half smooth: every interpolation tap matters, and values near 0 and 255 occur."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    coarse = Image.fromarray(rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    mixed = np.where(np.arange(size[0])[None, :, None] < size[0] // 2, noise, np.asarray(coarse))
    return Image.fromarray(mixed.astype(np.uint8))


@pytest.mark.parametrize(
    "name, value",
    [
        ("shear_x", 0.3),
        ("shear_x", -0.27),
        ("shear_y", 0.21),
        ("shear_y", -0.3),
        ("translate_x_rel", 0.37),
        ("translate_x_rel", -0.123),
        ("translate_y_rel", 0.45),
        ("translate_y_rel", -0.2),
        ("translate_x_abs", 7.6),
        ("translate_y_abs", -60.0),  # beyond the picture: all fill
    ],
)
def test_line_shift_ops_equal_pillows_bicubic_affine_including_edges_and_fill(name, value):
    picture = noisy_picture(3)
    expected = np.asarray(
        getattr(auto_augment, name)(picture, value, fillcolor=FILL, resample=Image.Resampling.BICUBIC), np.int32
    )
    got = apply_recorded(pil_to_chw(picture), [(name, (value,), "bicubic")], FILL)
    assert got.dtype == torch.uint8 and got.shape == (3, 37, 48)
    difference = np.abs(np.asarray(chw_to_pil(got), np.int32) - expected)
    # The same filter, taps, clamping and fill rule; float rounding in another order moves a truncated value by one.
    assert difference.max() <= 1, name
    assert (difference > 0).mean() < 0.01, name


@pytest.mark.parametrize(
    "name, args",
    [
        ("invert", ()),
        ("posterize", (0,)),
        ("posterize", (3,)),
        ("posterize", (8,)),
        ("solarize", (0,)),
        ("solarize", (100,)),
        ("solarize", (256,)),
        ("solarize_add", (60,)),
        ("solarize_add", (110, 200)),
        ("brightness", (0.1,)),
        ("brightness", (1.9,)),
        ("contrast", (0.1,)),
        ("contrast", (1.0,)),
        ("contrast", (1.9,)),
        ("color", (0.1,)),
        ("color", (1.9,)),
        ("sharpness", (0.1,)),
        ("sharpness", (1.9,)),
        ("auto_contrast", ()),
        ("equalize", ()),
    ],
)
def test_point_and_enhance_ops_on_the_tensor_equal_timms_pillow_ops_exactly(name, args):
    """Each op runs on the tensor without a trip through Pillow, and gives Pillow's exact levels."""
    function = _posterize if name == "posterize" else getattr(auto_augment, name)
    pictures = [noisy_picture(seed, size=(64, 50)) for seed in range(4)]
    pictures.append(Image.fromarray((np.asarray(pictures[0]) // 3 + 40).astype(np.uint8)))  # a narrow range
    pictures.append(Image.new("RGB", (64, 50), (7, 7, 200)))  # one level per band
    for seed, picture in enumerate(pictures):
        expected = np.asarray(function(picture, *args))
        got = apply_recorded(pil_to_chw(picture), [(name, args, None)], FILL)
        assert got.dtype == torch.uint8 and got.shape == (3, 50, 64)
        assert np.array_equal(np.asarray(chw_to_pil(got)), expected), (name, args, seed)


def test_recorded_randaugment_reproduces_timms_pillow_randaugment_draw_by_draw():
    """Same seed: the ops, magnitudes and results of timm's own RandAugment (rand-m9-mstd0.5-inc1), on noise."""
    transform = create_train_transform(input_size=48)
    timm_randaugment = next(step for step in transform.transforms if isinstance(step, auto_augment.RandAugment))
    sampler = ParamSampler(transform)
    names = set()
    for seed in range(60):
        picture = noisy_picture(seed)
        random.seed(seed)
        np.random.seed(seed)
        expected = np.asarray(timm_randaugment(picture), np.int32)
        random.seed(seed)
        np.random.seed(seed)
        ops = sampler.sample_ops()
        names.update(name for name, _, _ in ops)
        got = np.asarray(chw_to_pil(apply_recorded(pil_to_chw(picture), ops, FILL)), np.int32)
        difference = np.abs(got - expected)
        # One level where a shear or translation rounds differently, carried through the op after it (solarize
        # or posterize can turn one level into more, so count pixels, not levels).
        assert (difference > 1).mean() < 0.005, (seed, ops)
    assert len(names) >= 12  # the draws reach nearly all of the 15 ops


def test_posterize_to_zero_bits_in_the_worker_gives_a_black_picture():
    picture = noisy_picture(5)
    got = apply_recorded(pil_to_chw(picture), [("posterize", (0,), None)], FILL)
    assert torch.equal(got, torch.zeros_like(got))
    expected = np.asarray(_posterize(picture, 3), np.int32)
    got = apply_recorded(pil_to_chw(picture), [("posterize", (3,), None)], FILL)
    assert np.array_equal(np.asarray(chw_to_pil(got), np.int32), expected)


def test_the_per_image_ops_of_a_cpu_stage_agree_with_the_batched_ops_a_gpu_stage_runs():
    """decode=device on a CPU runs RandAugment per image (Pillow's ops); on a GPU, batched tensor ops."""
    transform = create_device_train_transform(input_size=32, re_prob=0.0)
    items = []
    for k in range(16):
        seed_all(k)
        items.append(transform(encoded(smooth_jpeg(k, size=(60 + k, 45 + k)), key=str(k))))
    results = []
    for per_image in (True, False):
        stage = transform.make_stage(train=True, seed=0, rank=0)
        assert stage.per_image_ops  # the CPU default
        stage.per_image_ops = per_image
        results.append(stage.finish_train(transform.collate(items), torch.arange(16), [], seed=3)[0])
    difference = (results[0] - results[1]).abs().mean(dim=(1, 2, 3))  # normalised units; 1 level ~ 0.017
    assert difference.mean() < 0.03 and difference.max() < 0.1, difference
    assert (difference == 0).sum() >= 2  # samples without a geometric op come out identical


def test_batch_buffers_reuse_memory_only_when_no_tensor_or_view_refers_to_it():
    buffers = BatchBuffers()
    first = buffers.take(torch.Size([4, 3, 8, 8]))
    address = first.data_ptr()
    del first
    second = buffers.take(torch.Size([4, 3, 8, 8]))
    assert second.data_ptr() == address  # dropped: reused
    view = second[1:]
    del second
    third = buffers.take(torch.Size([4, 3, 8, 8]))
    assert third.data_ptr() != address  # a view still holds it
    assert buffers.take(torch.Size([2, 3, 8, 8])).data_ptr() not in (address, third.data_ptr())  # other size
    del view


def test_batches_a_consumer_keeps_are_never_overwritten_by_later_ones():
    transform = create_device_train_transform(input_size=32, re_prob=0.5, re_mode="pixel")
    batches = []
    for b in range(3):
        items = []
        for k in range(8):
            seed_all(100 * b + k)
            items.append(transform(encoded(smooth_jpeg(100 * b + k, size=(60 + k, 45 + k)), key=str(k))))
        batches.append(items)
    stage = transform.make_stage(train=True, seed=0, rank=0)
    kept = [
        stage.finish_train(transform.collate(items), torch.arange(8), [], seed=b)[0] for b, items in enumerate(batches)
    ]
    for b, items in enumerate(batches):  # each batch again with a fresh stage (fresh buffers)
        fresh = transform.make_stage(train=True, seed=0, rank=0)
        assert torch.equal(kept[b], fresh.finish_train(transform.collate(items), torch.arange(8), [], seed=b)[0])
    dropped = stage.finish_train(transform.collate(batches[0]), torch.arange(8), [], seed=0)[0]
    assert torch.equal(dropped, kept[0]) and dropped.data_ptr() not in {t.data_ptr() for t in kept}
