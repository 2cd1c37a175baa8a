"""The options of the shard readers: how an epoch draws its samples, how samples are read and handed over."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # tar member extensions read as the image, first present wins


@dataclass(frozen=True)
class TrainSampling:
    """How a training epoch draws its samples. With the world size and `num_workers` it fixes every batch of
    every epoch (docs/data.md, "Loaders", says how the epoch is cut among the readers).

    Args:
        seed: seed shared by all ranks (shard order, sample shuffle, augmentation, batch transform).
        samples_per_epoch: samples per epoch over all ranks; default: the split's sample count. Each rank yields
            ceil(samples_per_epoch / (world_size * batch_size)) batches.
        resampled: draw shards with replacement (any shard count) instead of one pass over a shuffled shard order
            (which needs at least world_size * max(1, num_workers) shards).
        shuffle_buffer: raw samples in each reader's shuffle buffer (<= 1: no sample shuffle).
        shuffle_initial: samples buffered before the first is released.
        repeated_aug: places in the batches each sample takes, each with its own augmentation (1: off); the
            epoch length does not change, so an epoch uses 1/repeated_aug as many distinct samples.
    """

    seed: int = 0
    samples_per_epoch: int | None = None
    resampled: bool = False
    shuffle_buffer: int = 5000
    shuffle_initial: int = 1000
    repeated_aug: int = 1

    def __post_init__(self) -> None:
        repeats = self.repeated_aug
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeated_aug must be an integer >= 1 (1: off), got {repeats!r}")


@dataclass(frozen=True)
class ShardReading:
    """How samples are read from the shards, checked, and handed to the caller.

    Args:
        image_keys: tar member extensions holding the image, first present wins.
        label_key: tar member extension holding the class index.
        num_classes: labels outside [0, num_classes) count as bad data; None: not checked.
        pin_memory: pin batches in page-locked memory.
        prefetch_factor: batches each worker prepares ahead (None: the DataLoader default).
        open_timeout: seconds to wait for an HTTP connection.
    """

    image_keys: Sequence[str] = IMAGE_KEYS
    label_key: str = "cls"
    num_classes: int | None = None
    pin_memory: bool = False
    prefetch_factor: int | None = None
    open_timeout: float = 60.0
