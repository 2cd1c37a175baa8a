"""The device data path on CUDA: nvJPEG decode and device augmentation agree with the same stage on the CPU, and a
JPEG nvJPEG rejects is skipped and counted (run by scripts/gpu_check_data.sh)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_data_device import SIZE, encoded, seed_all, shards, smooth_jpeg  # noqa: F401

from pace.data import (
    create_device_eval_transform,
    create_device_train_transform,
    create_eval_loader,
    create_train_loader,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _finish_on(device: str, train: bool, items: list, transform) -> torch.Tensor:
    stage = transform.make_stage(train=train, seed=0, rank=0, device=torch.device(device))
    stage.per_image_ops = False  # the batched ops on both devices (the per-image CPU ops are tested on their own)
    batch = transform.collate(items)
    targets = torch.arange(len(items))
    if train:
        return stage.finish_train(batch, targets, [], seed=3)[0].cpu()
    return stage.finish_eval(batch, targets, [str(k) for k in range(len(items))], [])[0].cpu()


@pytest.mark.parametrize("train", [True, False])
def test_cuda_stage_agrees_with_the_cpu_stage(train):
    if train:
        transform = create_device_train_transform(input_size=SIZE, re_prob=0.0)
    else:
        transform = create_device_eval_transform(input_size=SIZE)
    items = []
    for k in range(16):
        seed_all(k)
        items.append(transform(encoded(smooth_jpeg(k, size=(60 + k, 45 + k)), key=str(k))))
    on_cpu, on_cuda = _finish_on("cpu", train, items, transform), _finish_on("cuda", train, items, transform)
    # nvJPEG's IDCT/upsampling and CUDA's resampling differ from libjpeg-turbo's and the CPU's by a level or two.
    assert (on_cpu - on_cuda).abs().mean() < 0.03


def test_cuda_training_and_evaluation_skip_and_count_the_rejected_jpeg(shards):  # noqa: F811
    directory, keys = shards
    transform = create_device_train_transform(input_size=SIZE, device="cuda")
    loader = create_train_loader(directory, batch_size=6, transform=transform, num_workers=2, max_error_fraction=0.1)
    batches = list(loader)
    assert all(images.is_cuda and images.shape == (6, 3, SIZE, SIZE) for images, _ in batches)
    assert loader.stats.bad_by_kind == Counter({"corrupt_image": 1})
    evaluation = create_eval_loader(
        directory,
        batch_size=5,
        transform=create_device_eval_transform(input_size=SIZE, device="cuda"),
        split="val",
        num_workers=2,
        max_error_fraction=0.1,
    )
    seen = [key for _, _, batch_keys in evaluation for key in batch_keys]
    assert sorted(seen) == keys and evaluation.stats.bad_by_kind == Counter({"corrupt_image": 1})
