"""The `synthetic` source: class-conditional random tensors drawn on the fly, no files (smoke and throughput runs).

Not to be confused with `pace.data.quickstart`, which writes generated images as real JPEG shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from pace.distributed import DistEnv


class SyntheticTensors:
    """Class-conditional random images, reproducible from (seed, split, epoch, rank, batch index).

    Each class is a smooth random colour pattern; samples add noise to it, so a model can learn the classes
    (smoke tests see the loss fall) while no file is read (throughput runs measure compute alone).

    Args:
        num_samples: images in the split over all ranks (each rank takes `num_samples // world_size`).
        num_classes: classes.
        img_size: square image side.
        batch_size: images per batch on this rank.
        env: this process's place in the job.
        seed: base seed (the class patterns depend on it alone, so every split shares them).
        split: salt that separates the training and held-out draws.
        noise: standard deviation of the per-sample noise.
        keys: also yield each sample's key (`synthetic/<split>/<epoch>/<rank>/<batch>/<i>`), as evaluation needs.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        num_classes: int,
        img_size: int,
        batch_size: int,
        env: DistEnv,
        seed: int = 0,
        split: int = 0,
        noise: float = 1.0,
        keys: bool = False,
    ) -> None:
        self.num_classes = num_classes
        self.img_size = img_size
        self.batch_size = batch_size
        self.rank = env.rank
        self.world_size = env.world_size
        self.seed = seed
        self.split = split
        self.noise = noise
        self.keys = keys
        self.epoch, self.start_batch = 0, 0
        self.num_batches = num_samples // env.world_size // batch_size
        if self.num_batches == 0:
            raise ValueError(f"synthetic split of {num_samples} samples gives rank {env.rank} no batch of {batch_size}")
        generator = torch.Generator().manual_seed(batch_seed(seed))  # any int: a config seed is unbounded
        coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
        self.patterns = F.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Choose the epoch the next iteration yields and the batch it starts at.

        Args:
            epoch: epoch index (changes the draw).
            start_batch: first batch to yield.
        """
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def _batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(batch_seed(self.seed, self.split, self.epoch, self.rank, index))
        targets = torch.randint(self.num_classes, (self.batch_size,), generator=generator)
        noise = torch.randn(self.batch_size, 3, self.img_size, self.img_size, generator=generator)
        return self.patterns[targets] + self.noise * noise, targets  # (B, 3, H, W), (B,)

    @property
    def num_samples(self) -> int:
        """Samples of one epoch over all ranks."""
        return self.num_batches * self.batch_size * self.world_size

    def __iter__(self) -> Iterator[tuple]:
        for index in range(self.start_batch, self.num_batches):
            images, targets = self._batch(index)
            if not self.keys:
                yield images, targets
                continue
            prefix = f"synthetic/{self.split}/{self.epoch}/{self.rank}/{index}"
            yield images, targets, [f"{prefix}/{i}" for i in range(len(targets))]


def batch_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers of any size and sign (a plain product overflows torch's int64 seed).

    Args:
        parts: the integers that identify the batch (seed, split, epoch, rank, batch index).

    Returns:
        A seed in [0, 2**63), the same on every platform and Python version.
    """
    digest = hashlib.blake2b(b",".join(b"%d" % p for p in parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
