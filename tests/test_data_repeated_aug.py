"""Repeated augmentation in the training loader: each sample fills k consecutive slots with its own augmentations;
the epoch stays deterministic and resumable; `aug.repeated_aug` reaches the loader."""

from __future__ import annotations

import pytest
import torch
from data_helpers import batches_equal, fixed_transform, make_uneven_shards, random_transform
from test_configs import compose_train
from train_helpers import FAST, make_tiny_shards

from pace.data import TrainSampling, create_eval_loader, create_train_loader
from pace.data.pipeline import train_quotas
from pace.distributed import DistEnv
from pace.train.config import validate
from pace.train.data_builders import build_data

R = 3  # DeiT's repeat count
B = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 uneven shards (sizes 11, 11, 11, 11, 11, 5) of 60 images in 4 classes."""
    return make_uneven_shards(tmp_path_factory.mktemp("repeated"))


@pytest.fixture(scope="module")
def catalogue(shards):
    """Fingerprint of each image under the deterministic transform -> (key, label), read by the eval loader."""
    loader = create_eval_loader(shards, split="train", batch_size=8, transform=fixed_transform(), num_workers=0)
    entries = {
        _fingerprint(image): (key, int(label))
        for images, labels, keys in loader
        for image, label, key in zip(images, labels, keys)
    }
    assert len(entries) == 60  # the fingerprints tell every sample apart
    return entries


class _IdentityAndAugmentation:
    """Each image as a pair: a deterministic resize that identifies the sample, and a random augmentation."""

    def __init__(self):
        self.fixed, self.random = fixed_transform(), random_transform()

    def __call__(self, image):
        return self.fixed(image), self.random(image)


def _fingerprint(image: torch.Tensor) -> tuple:
    return tuple(image.flatten().tolist())


def _loader(shards, *, samples_per_epoch=None, repeated_aug=R, **kwargs):
    sampling = TrainSampling(seed=7, shuffle_buffer=20, samples_per_epoch=samples_per_epoch, repeated_aug=repeated_aug)
    options = {"batch_size": B, "transform": _IdentityAndAugmentation(), "sampling": sampling}
    return create_train_loader(shards, **{**options, **kwargs})


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(identity images, augmented images, targets) per batch."""
    return [(ids, augmented, targets) for (ids, augmented), targets in loader]


def _worker_slots(batches: list[tuple], workers: int, first_batch: int = 0) -> list[list[tuple]]:
    """Each logical worker's slots in order, as (fingerprint, augmented image, target); worker l made batches
    l, l + W, ... of the epoch."""
    streams: list[list[tuple]] = [[] for _ in range(workers)]
    for b, (ids, augmented, targets) in enumerate(batches, start=first_batch):
        streams[b % workers] += [(_fingerprint(i), a, int(t)) for i, a, t in zip(ids, augmented, targets)]
    return streams


def _runs(slots: list[tuple]) -> list[list[tuple]]:
    """Maximal runs of consecutive slots holding the same sample."""
    runs: list[list[tuple]] = []
    for slot in slots:
        if runs and runs[-1][0][0] == slot[0]:
            runs[-1].append(slot)
        else:
            runs.append([slot])
    return runs


def test_copies_fill_consecutive_slots_with_the_label_of_their_sample_and_their_own_augmentations(shards, catalogue):
    batches = _batches(_loader(shards, num_workers=2))
    assert len(batches) == 15 and all(len(targets) == B for _, _, targets in batches)  # ceil(60 / 4), unchanged
    leaders = []
    for worker, slots in enumerate(_worker_slots(batches, workers=2)):
        quota = train_quotas(15, 2, B, R)[worker]  # 8 and 7 batches: 32 and 28 slots -> 11 and 10 samples
        runs = _runs(slots)
        # Groups of R in a row from the worker's first slot (a group cut by a batch end goes on in the worker's
        # next batch); only the last group, cut by the epoch's end, is shorter.
        assert [len(run) for run in runs] == [R] * (quota - 1) + [len(slots) - R * (quota - 1)]
        for run in runs:
            key, label = catalogue[run[0][0]]
            assert all(target == label for _, _, target in run), key
            augmented = [a for _, a, _ in run]
            assert all(not torch.equal(x, y) for i, x in enumerate(augmented) for y in augmented[i + 1 :]), key
        leaders += [run[0][0] for run in runs]
    assert len(leaders) == len(set(leaders)) == 21  # one pass: the readers' samples are distinct


def test_a_group_spans_two_batches_when_the_batch_size_is_not_a_multiple(shards):
    first, second = _batches(_loader(shards, num_workers=0))[:2]
    ids, later = [_fingerprint(image) for image in first[0]], [_fingerprint(image) for image in second[0]]
    # Slots 0-2 are one sample, slot 3 starts the next, which fills slots 0 and 1 of the next batch.
    assert ids[0] == ids[1] == ids[2] != ids[3] == later[0] == later[1] != later[2]


@pytest.mark.parametrize(("samples_per_epoch", "plain_samples"), [(60, 20), (180, 60)])
def test_the_sample_stream_is_the_plain_stream_with_each_sample_repeated(shards, samples_per_epoch, plain_samples):
    # One reader reading the same number of raw samples sees the same stream with and without repeats.
    repeated = _loader(shards, num_workers=0, samples_per_epoch=samples_per_epoch)
    plain = _loader(shards, num_workers=0, samples_per_epoch=plain_samples, repeated_aug=1)
    repeated_batches, plain_batches = _batches(repeated), _batches(plain)
    ids = torch.cat([i for i, _, _ in repeated_batches])
    assert torch.equal(ids, torch.cat([i for i, _, _ in plain_batches]).repeat_interleave(R, dim=0))
    targets = torch.cat([t for _, _, t in repeated_batches])
    assert torch.equal(targets, torch.cat([t for _, _, t in plain_batches]).repeat_interleave(R))
    assert repeated.stats.samples == repeated.stats.decoded == plain.stats.decoded == plain_samples
    if samples_per_epoch == 180:  # samples_per_epoch = R x the data: every sample R times
        counts = torch.unique(ids.flatten(1), dim=0, return_counts=True)[1]
        assert len(counts) == 60 and set(counts.tolist()) == {R}


@pytest.mark.parametrize(("num_workers", "starts"), [(0, (1, 3, 7, 14)), (2, (1, 2, 5, 13))])
def test_the_epoch_is_deterministic_and_resumes_exactly_inside_a_group(shards, num_workers, starts):
    full = _batches(_loader(shards, num_workers=num_workers, epoch=2))
    assert batches_equal(_batches(_loader(shards, num_workers=num_workers, epoch=2)), full)
    assert not batches_equal(_batches(_loader(shards, num_workers=num_workers, epoch=3)), full)
    workers = max(1, num_workers)
    # The first worker's second batch (batch 1, or 2 with two workers) begins inside a group its first began.
    slots = _worker_slots(full, workers)[0]
    assert slots[B - 1][0] == slots[B][0]
    for k in starts:
        resumed = _loader(shards, num_workers=num_workers, epoch=2, start_batch=k)
        assert batches_equal(_batches(resumed), full[k:]), k
        # Only the samples of the yielded batches were decoded: one per run of copies in each worker's slots.
        assert resumed.stats.decoded == sum(len(_runs(s)) for s in _worker_slots(full[k:], workers, k)), k


def test_bad_repeat_counts_are_rejected(shards):
    for value in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="repeated_aug must be an integer >= 1"):
            _loader(shards, num_workers=0, repeated_aug=value)


@pytest.mark.parametrize("repeats", [1, 2])
def test_the_config_key_reaches_the_training_loader(tmp_path, repeats):
    # aug=none (full-image crop, no flip) is deterministic, so the copies of a sample are equal images.
    overrides = (*FAST, *make_tiny_shards(tmp_path / "shapes"), "aug=none", f"aug.repeated_aug={repeats}")
    cfg = validate(compose_train(*overrides))
    train, _, _ = build_data(
        cfg.data, cfg.aug, {}, DistEnv(), cfg.seed, eval_config={"mean": (0.5,) * 3, "std": (0.5,) * 3}, mixup=None
    )
    images, targets = next(iter(train))
    pairs_equal = [torch.equal(images[i], images[i + 1]) for i in range(0, len(images), 2)]
    assert all(pairs_equal) if repeats == 2 else not any(pairs_equal)
    if repeats == 2:
        assert torch.equal(targets[0::2], targets[1::2])
