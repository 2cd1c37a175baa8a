"""The deferred decode paths (`decode=device`, `decode=draft`) on device="cpu": the same augmentation as timm's CPU
transform, evaluation equal to the CPU eval transform, exact resume, exact-once evaluation, and a JPEG the
decoder rejects skipped and counted."""

from __future__ import annotations

import io
import math
import random
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import write_tar
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from pace.data import (
    TrainSampling,
    create_device_eval_transform,
    create_device_train_transform,
    create_eval_loader,
    create_eval_transform,
    create_mixup,
    create_train_loader,
    create_train_transform,
)
from pace.data.device_augment import EncodedImage, ParamSampler, SampleParams, apply_ops, decode_scaled, resize_crops
from pace.data.info import write_info

SIZE = 32  # output side of the tests (small: the suite runs on 2 cores)


def smooth_jpeg(seed: int, size: tuple[int, int] = (60, 45), quality: int = 90) -> bytes:
    """A JPEG with smooth content (resampling differences stay small, unlike on white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def encoded(data: bytes, key: str = "k") -> EncodedImage:
    return EncodedImage(data, Image.open(io.BytesIO(data)), "mem", key)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finish(transform, item) -> torch.Tensor:
    stage = transform.make_stage(train=True, seed=0, rank=0)
    images, _ = stage.finish_train(transform.collate([item]), torch.tensor([0]), [], seed=1)
    return images[0]


OPTIONS = {"input_size": SIZE, "re_mode": "const", "re_prob": 0.25}


def test_draft_path_reproduces_timm_transform_sample_by_sample():
    """Same seed, same draws in the same order: the draft path's output is timm's CPU transform's output."""
    reference = create_train_transform(**OPTIONS)
    draft = create_device_train_transform(draft=True, **OPTIONS)
    for k in range(24):
        data = smooth_jpeg(k)
        seed_all(k)
        expected = reference(Image.open(io.BytesIO(data)).convert("RGB"))
        seed_all(k)
        got = finish(draft, draft(encoded(data)))
        # The crop is resampled on a float box by Pillow in one step instead of crop-then-resize: a level of
        # rounding here and there (1 level = 1/(255 * 0.225) ~ 0.017 after normalisation).
        assert (got - expected).abs().mean() < 0.01, k


def test_device_path_draws_timm_choices_and_matches_its_output_within_interpolation_tolerance():
    reference = create_train_transform(**OPTIONS)
    device = create_device_train_transform(**OPTIONS)
    errors, ops = [], Counter()
    for k in range(40):
        data = smooth_jpeg(k)
        seed_all(k)
        expected = reference(Image.open(io.BytesIO(data)).convert("RGB"))
        seed_all(k)
        item = device(encoded(data))
        ops.update(name for name, _, _ in item[1].ops)
        errors.append((finish(device, item) - expected).abs().mean().item())
    assert len(ops) >= 8  # the draws reach most of RandAugment's ops
    # Tensor resampling (bicubic on torch, grid_sample for the geometric ops) against Pillow: a few levels.
    assert np.median(errors) < 0.02 and max(errors) < 0.15, errors


@pytest.mark.parametrize(
    "op, args",
    [
        ("rotate", (25.0,)),
        ("shear_x", (0.3,)),
        ("shear_y", (-0.3,)),
        ("translate_x_rel", (0.3,)),
        ("translate_y_rel", (-0.2,)),
        ("color", (1.6,)),
        ("contrast", (0.4,)),
        ("brightness", (1.5,)),
        ("sharpness", (1.8,)),
        ("posterize", (2,)),
        ("posterize", (0,)),
        ("solarize", (100,)),
        ("solarize_add", (60, 128)),
        ("auto_contrast", ()),
        ("equalize", ()),
        ("invert", ()),
    ],
)
def test_each_randaugment_op_on_tensors_matches_timms_pillow_op(op, args):
    from timm.data import auto_augment

    from pace.data.transforms import _posterize

    picture = Image.open(io.BytesIO(smooth_jpeg(7, size=(40, 40)))).convert("RGB")
    fill = (124, 116, 104)
    function = _posterize if op == "posterize" else getattr(auto_augment, op)
    kwargs = {"fillcolor": fill, "resample": Image.Resampling.BILINEAR}
    expected = torch.from_numpy(np.asarray(function(picture, *args, **kwargs)).copy()).permute(2, 0, 1).float()
    tensor = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    other = torch.zeros_like(tensor)  # a second sample with no op: grouping must leave it alone
    got = apply_ops(torch.stack([tensor, other]), [(op, args, "bilinear"), None], fill)
    assert torch.equal(got[1], other)
    difference = (got[0].float() - expected).abs()
    inner = difference[:, 2:-2, 2:-2]  # edge pixels of the geometric ops depend on each library's edge rule
    assert inner.mean() < 1.5, op
    if op in ("rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel"):
        # Where the source leaves the picture the two libraries may decide a pixel differently (fill or edge).
        assert (inner > 8).float().mean() < 0.03, op
    else:
        assert inner.max() <= 2, op


def test_the_float_resize_used_on_gpus_matches_the_uint8_one_used_on_cpus():
    pictures = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(smooth_jpeg(4, (70, 50))))).copy()).permute(2, 0, 1)]
    pictures *= 3
    params = [
        SampleParams(crop=(3, 5, 40, 60), interpolation="bicubic"),
        SampleParams(crop=(0, 0, 50, 70), interpolation="bilinear"),
        SampleParams(crop=(10, 20, 12, 9), interpolation="bicubic"),  # upsampled
    ]
    on_cpu = resize_crops(pictures, params, 24, uint8_kernel=True)
    on_gpu = resize_crops(pictures, params, 24, uint8_kernel=False)
    assert on_cpu.shape == on_gpu.shape == (3, 3, 24, 24) and on_gpu.dtype == torch.uint8
    assert (on_cpu.float() - on_gpu.float()).abs().max() <= 1  # one level of rounding apart


def test_crop_parameter_statistics_follow_the_random_resized_crop_law():
    """Many draws: area fraction ~ U(scale) and log aspect ~ U(log ratio) (up to pixel rounding and timm's
    retries), checked against the law itself, and against timm's sampler drawing on its own."""
    transform = create_train_transform(input_size=SIZE, scale=(0.08, 1.0))
    sampler = ParamSampler(transform)
    header = Image.open(io.BytesIO(smooth_jpeg(0, size=(500, 375))))
    rrc = RandomResizedCropAndInterpolation(SIZE, scale=(0.08, 1.0))
    random.seed(1)
    ours = np.array([sampler.sample(header).crop for _ in range(4000)])
    random.seed(2)
    theirs = np.array([rrc.get_params(header, rrc.scale, rrc.ratio) for _ in range(4000)])
    for crops in (ours, theirs):
        area = crops[:, 2] * crops[:, 3] / (500 * 375)
        log_aspect = np.log(crops[:, 3] / crops[:, 2])
        assert 0.40 < area.mean() < 0.52  # U(0.08, 1) has mean 0.54; draws that do not fit are retried smaller
        assert abs(log_aspect.mean()) < 0.03 and abs(log_aspect.std() - math.log(4 / 3) * 2 / math.sqrt(12)) < 0.03
        assert (crops[:, 0] + crops[:, 2] <= 375).all() and (crops[:, 1] + crops[:, 3] <= 500).all()
    for column in range(4):  # the same distribution: quantiles within sampling noise
        q = np.linspace(0.1, 0.9, 9)
        assert np.allclose(np.quantile(ours[:, column], q), np.quantile(theirs[:, column], q), rtol=0.08, atol=4)


def test_draft_decode_takes_the_largest_scale_the_crop_allows():
    data = smooth_jpeg(3, size=(800, 600))
    full = np.asarray(decode_scaled(encoded(data), 1.5), dtype=np.float32)
    assert full.shape == (600, 800, 3)
    for headroom, scale in ((2.0, 2), (3.9, 2), (4.0, 4), (9.5, 8)):
        picture = decode_scaled(encoded(data), headroom)
        assert picture.size == (800 // scale, 600 // scale)
        # The reduced decode is the full picture at a smaller scale (box-filtered reference).
        reference = Image.fromarray(full.astype(np.uint8)).reduce(scale)
        assert np.abs(np.asarray(picture, np.float32) - np.asarray(reference, np.float32)).mean() < 3.0


def test_device_eval_equals_the_cpu_eval_transform():
    cpu = create_eval_transform(input_size=SIZE, crop_pct=0.875)
    device = create_device_eval_transform(input_size=SIZE, crop_pct=0.875)
    items = [device(encoded(smooth_jpeg(k, size=(60 + 7 * k, 45 + 3 * k)), key=str(k))) for k in range(6)]
    stage = device.make_stage(train=False, seed=0, rank=0)
    images, targets, keys = stage.finish_eval(device.collate(items), torch.arange(6), [str(k) for k in range(6)], [])
    assert keys == [str(k) for k in range(6)] and targets.tolist() == list(range(6))
    for k in range(6):
        expected = cpu(Image.open(io.BytesIO(smooth_jpeg(k, size=(60 + 7 * k, 45 + 3 * k)))).convert("RGB"))
        assert images[k].shape == expected.shape
        assert (images[k] - expected).abs().mean() < 0.02 and (images[k] - expected).abs().max() < 0.2


# -- through the loader ----------------------------------------------------------------------------------------


@pytest.fixture()
def shards(tmp_path):
    """4 shards of 12 smooth JPEGs of varied sizes; shard 1 also holds a JPEG with a readable header whose data
    is cut short (the decoder rejects it). Returns (directory, keys of the good samples)."""
    out = tmp_path / "shards"
    out.mkdir()
    keys = []
    for shard in range(4):
        samples = []
        for i in range(12):
            key = f"s{shard}_{i:02d}"
            size = (40 + (i % 4) * 9, 34 + (i % 3) * 7)
            samples.append({"__key__": key, "jpg": smooth_jpeg(shard * 100 + i, size=size), "cls": b"%d" % (i % 3)})
            keys.append(key)
        if shard == 1:
            whole = smooth_jpeg(999)
            samples.insert(5, {"__key__": "cut", "jpg": whole[: len(whole) - 40], "cls": b"1"})
        write_tar(out / f"d-{shard}.tar", samples)
    lengths = [12, 13, 12, 12]
    write_info(out, {"classes": ["a", "b", "c"], "splits": {"train": _split(lengths), "val": _split(lengths)}})
    return out, sorted(keys)


def _split(lengths):
    return {
        "name": "x",
        "num_samples": sum(lengths),
        "filenames": [f"d-{i}.tar" for i in range(len(lengths))],
        "shard_lengths": lengths,
    }


def _train_loader(directory, *, draft=False, start_batch=0, **kwargs):
    transform = create_device_train_transform(input_size=SIZE, draft=draft)
    mixup = create_mixup(num_classes=3)
    return create_train_loader(
        directory,
        batch_size=6,
        transform=transform,
        num_workers=2,
        sampling=TrainSampling(seed=5),
        start_batch=start_batch,
        batch_transform=mixup,
        max_error_fraction=0.1,
        **kwargs,
    )


@pytest.mark.parametrize("draft", [False, True])
def test_training_batches_are_full_resume_exactly_and_count_the_rejected_jpeg(shards, draft):
    directory, _ = shards
    loader = _train_loader(directory, draft=draft)
    full = list(loader)
    assert len(full) == loader.batches_per_epoch == 9
    assert all(images.shape == (6, 3, SIZE, SIZE) and targets.shape == (6, 3) for images, targets in full)
    assert loader.stats.bad_by_kind == Counter({"corrupt_image": 1})
    assert "key cut" in loader.stats.first_bad[0]
    assert all(torch.isfinite(images).all() for images, _ in full)
    resumed = _train_loader(directory, draft=draft, start_batch=4)
    tail = list(resumed)
    assert len(tail) == 5
    for (a, x), (b, y) in zip(full[4:], tail):
        assert torch.equal(a, b) and torch.equal(x, y)
    again = list(_train_loader(directory, draft=draft))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full, again))


def test_repeated_augmentation_gives_each_copy_its_own_draw(shards):
    directory, _ = shards
    transform = create_device_train_transform(input_size=SIZE, re_prob=0.0)
    loader = create_train_loader(
        directory,
        batch_size=6,
        transform=transform,
        num_workers=1,
        sampling=TrainSampling(seed=1, repeated_aug=3, shuffle_buffer=0),
    )
    images, targets = next(iter(loader))
    assert targets[0] == targets[1] == targets[2]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


def test_device_evaluation_reads_each_good_sample_once_and_counts_the_rejected_jpeg(shards):
    directory, keys = shards
    loader = create_eval_loader(
        directory,
        batch_size=5,
        transform=create_device_eval_transform(input_size=SIZE),
        split="val",
        num_workers=3,
        max_error_fraction=0.1,
    )
    seen = []
    for images, targets, batch_keys in loader:
        assert images.shape == (len(batch_keys), 3, SIZE, SIZE) and len(targets) == len(batch_keys)
        seen.extend(batch_keys)
    assert sorted(seen) == keys
    assert loader.stats.bad_by_kind == Counter({"corrupt_image": 1})


def test_the_prefetching_thread_yields_the_same_batches_and_stops_with_its_consumer(shards):
    directory, _ = shards
    plain = list(_train_loader(directory))
    loader = _train_loader(directory)
    loader.stage.prefetch = True
    threaded = list(loader)
    assert len(threaded) == len(plain) and loader.stats.bad_by_kind == Counter({"corrupt_image": 1})
    for (a, x), (b, y) in zip(plain, threaded):
        assert torch.equal(a, b) and torch.equal(x, y)
    batches = iter(loader)
    next(batches)
    batches.close()  # a consumer that stops early ends the thread
    deadline = time.monotonic() + 10
    while any(t.name == "pace-device-stage" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "pace-device-stage" for t in threading.enumerate())
