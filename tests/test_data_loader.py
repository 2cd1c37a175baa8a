"""Train/eval loaders: exact resume, determinism, equal batch counts per rank, eval coverage across ranks."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from data_helpers import batches_equal, fixed_transform, make_uneven_shards, random_transform
from torchvision import transforms

from pace.data import TrainSampling, create_eval_loader, create_mixup, create_train_loader, read_info
from pace.data.pipeline import train_assignment
from pace.distributed import DistEnv, resolve_dist_env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 uneven shards (sizes 11, 11, 11, 11, 11, 5) of 60 images in 4 classes."""
    return make_uneven_shards(tmp_path_factory.mktemp("loader"))


def _eval(shards, **kwargs):
    return create_eval_loader(shards, split="train", batch_size=4, transform=fixed_transform(), **kwargs)


def _fingerprints(images):
    return [tuple(image.flatten()[:32].tolist()) for image in images]


SAMPLING = TrainSampling(seed=7, shuffle_buffer=20)


def _train(shards, **kwargs):
    kwargs = {"batch_size": 4, "transform": random_transform(), "sampling": SAMPLING, **kwargs}
    return create_train_loader(shards, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batch_reproduces_the_rest_of_the_epoch_without_decoding_skipped_samples(shards, num_workers):
    loader = _train(shards, num_workers=num_workers, epoch=3)
    full = list(loader)
    assert len(full) == len(loader) == 15  # ceil(60 / 4)
    for k in (1, 6, 13):
        resumed = _train(shards, num_workers=num_workers, epoch=3, start_batch=k)
        assert len(resumed) == 15 - k
        assert batches_equal(list(resumed), full[k:])
        # Only the samples of the yielded batches were decoded.
        assert resumed.stats.decoded == (15 - k) * 4


def test_epoch_is_a_function_of_seed_epoch_and_workers(shards):
    first = list(_train(shards, num_workers=2))
    assert batches_equal(list(_train(shards, num_workers=2)), first)
    assert not batches_equal(list(_train(shards, num_workers=2, sampling=replace(SAMPLING, seed=8))), first)
    loader = _train(shards, num_workers=2)
    loader.set_epoch(1)
    assert not batches_equal(list(loader), first)
    # One pass with a single reader covers the data exactly (60 samples in 15 batches of 4).
    images = [image for batch, _ in _train(shards, num_workers=0, transform=fixed_transform()) for image in batch]
    reference = [image for batch, _, _ in _eval(shards, num_workers=0) for image in batch]
    assert sorted(_fingerprints(images)) == sorted(_fingerprints(reference))


def test_main_process_reading_leaves_global_rngs_alone(shards):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = random.random(), np.random.rand(), torch.rand(1)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    list(_train(shards, num_workers=0))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


@pytest.mark.parametrize("resampled", [False, True])
def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(shards, resampled):
    # 2 ranks x 2 workers over shards of 11, 11, 11, 11, 11 and 5 samples.
    counts = []
    for rank in range(2):
        loader = _train(
            shards,
            num_workers=2,
            env=DistEnv(rank=rank, world_size=2),
            batch_size=3,
            sampling=replace(SAMPLING, resampled=resampled),
        )
        batches = list(loader)
        assert all(len(targets) == 3 for _, targets in batches)
        counts.append(len(batches))
        assert len(batches) == len(loader)
    assert counts == [10, 10]  # ceil(60 / (2 * 3))


@pytest.mark.parametrize(
    "batch_size,samples_per_epoch,copies",
    [(3, None, {1: 60}), (4, None, {1: 56, 2: 4}), (3, 120, {2: 60})],
)
def test_one_pass_reads_every_sample_once_over_uneven_shards_and_several_readers(
    shards, batch_size, samples_per_epoch, copies
):
    # 2 ranks x 2 workers over shards of 11, 11, 11, 11, 11 and 5 samples. Batch 3: 2 x 10 batches = 60 samples,
    # each once. Batch 4: 2 x 8 batches = 64, each once plus 4 top-ups. 120 samples per epoch: each twice.
    reference = _fingerprints(image for batch, _, _ in _eval(shards, num_workers=0) for image in batch)
    seen = []
    for rank in range(2):
        loader = _train(
            shards,
            num_workers=2,
            env=DistEnv(rank=rank, world_size=2),
            batch_size=batch_size,
            sampling=replace(SAMPLING, samples_per_epoch=samples_per_epoch),
            transform=fixed_transform(),
        )
        seen += _fingerprints(image for batch, _ in loader for image in batch)
    counts = Counter(seen)
    assert set(counts) == set(reference) and len(reference) == 60
    assert Counter(counts.values()) == copies


def test_train_assignment_splits_samples_in_proportion_to_quotas():
    lengths, order = [11, 11, 11, 11, 11, 5], [5, 0, 3, 1, 4, 2]
    for quotas in ([15, 15, 15, 15], [18, 15, 18, 15], [30, 30, 30, 30], [6, 3, 6, 3], [12, 0, 12, 0]):
        plan = train_assignment(lengths, order, quotas)
        owned = [
            (index, sample)
            for pieces in plan
            for index, start, stop in pieces
            for sample in range(start, lengths[index] if stop is None else stop)
        ]
        # Readers take consecutive runs of the samples in shard order: together, each sample once.
        assert owned == [(index, n) for index in order for n in range(lengths[index])]
        sizes = [sum((lengths[i] if stop is None else stop) - start for i, start, stop in p) for p in plan]
        for size, quota in zip(sizes, quotas):
            assert abs(size - 60 * quota / sum(quotas)) < 1  # in proportion to the quota
        # A piece that runs to its shard's end says so (its reader then checks how the shard ends).
        assert all(stop is None or stop < lengths[index] for pieces in plan for index, _, stop in pieces)


def test_ranks_draw_different_samples(shards):
    keys = []
    for rank in range(2):
        loader = _train(shards, num_workers=0, env=DistEnv(rank=rank, world_size=2), transform=fixed_transform())
        keys.append([image.sum().item() for images, _ in loader for image in images])
    assert keys[0] != keys[1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_too_few_shards_for_one_pass_is_a_clear_error_and_resampling_works(shards):
    with pytest.raises(ValueError, match="6 shards cannot be split over 2 ranks x 4 workers"):
        _train(shards, num_workers=4, env=DistEnv(rank=0, world_size=2))
    loader = _train(
        shards,
        num_workers=4,
        env=DistEnv(rank=0, world_size=2),
        sampling=replace(SAMPLING, resampled=True),
        batch_size=5,
    )
    assert len(list(loader)) == len(loader) == 6


def test_samples_per_epoch_sets_the_epoch_length(shards):
    loader = _train(shards, num_workers=0, sampling=replace(SAMPLING, samples_per_epoch=100))
    assert len(list(loader)) == 25


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (3, 1), (4, 3)])
def test_eval_sees_every_sample_exactly_once_across_ranks_and_workers(shards, world_size, num_workers):
    info = read_info(shards)
    keys = []
    for rank in range(world_size):
        loader = create_eval_loader(
            shards,
            split="train",
            batch_size=4,
            transform=fixed_transform(),
            num_workers=num_workers,
            env=DistEnv(rank=rank, world_size=world_size),
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        keys += [key for _, _, batch_keys in batches for key in batch_keys]
    assert len(keys) == info["splits"]["train"]["num_samples"] == 60
    assert len(set(keys)) == 60


def test_the_caller_passes_the_place_in_the_job_and_the_environment_is_not_read(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    options = {"split": "train", "batch_size": 4, "transform": fixed_transform(), "num_workers": 0}
    loader = create_eval_loader(shards, **options)
    assert (loader.dataset.rank, loader.dataset.world_size) == (0, 1)  # no env given: a single process
    loader = create_eval_loader(shards, env=resolve_dist_env(), **options)
    assert (loader.dataset.rank, loader.dataset.world_size) == (1, 2)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        create_eval_loader(shards, env=DistEnv(rank=2, world_size=2), **options)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        _train(shards, num_workers=0, env=DistEnv(rank=2, world_size=2))


def test_mixup_in_the_loader_is_deterministic_and_resumable(shards):
    mixup = create_mixup(num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0)
    kwargs = {
        "batch_transform": mixup,
        "transform": transforms.Compose([random_transform(), transforms.ConvertImageDtype(torch.float32)]),
    }
    full = list(_train(shards, num_workers=2, **kwargs))
    images, targets = full[0]
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    assert batches_equal(list(_train(shards, num_workers=2, start_batch=5, **kwargs)), full[5:])
    with pytest.raises(ValueError, match="even"):
        _train(shards, num_workers=0, batch_transform=mixup, batch_size=3)
