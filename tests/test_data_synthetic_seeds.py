"""The synthetic source's seeds: any integer a config can hold gives reproducible, distinct batches."""

from __future__ import annotations

import pytest
import torch

from pace.data.synthetic_tensors import SyntheticTensors, batch_seed
from pace.distributed import DistEnv

SEEDS = [0, 1, 2, 7, 12345, 2**31 - 1, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64 + 3, -1, -(2**63)]


def _images(seed: int, *, epoch: int = 0, rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, ...]]:
    data = SyntheticTensors(
        num_samples=24,
        num_classes=3,
        img_size=8,
        batch_size=4,
        env=DistEnv(rank=rank, world_size=world_size),
        seed=seed,
    )
    data.set_epoch(epoch)
    return list(data)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_seed_gives_a_reproducible_epoch(seed):
    # seed=1 used to overflow torch's int64 seed in the product of seed, split, epoch, rank and batch index.
    first, again = _images(seed, epoch=3), _images(seed, epoch=3)
    assert len(first) == 6
    for (a, ta), (b, tb) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(first[0][0], first[1][0])  # batches of an epoch differ
    assert not torch.equal(first[0][0], _images(seed, epoch=4)[0][0])  # so do epochs


def test_seeds_and_ranks_draw_different_batches():
    firsts = [_images(seed)[0][0] for seed in SEEDS]
    for i in range(len(firsts)):
        for j in range(i):
            assert not torch.equal(firsts[i], firsts[j]), (SEEDS[i], SEEDS[j])
    rank0, rank1 = _images(1, rank=0, world_size=2), _images(1, rank=1, world_size=2)
    assert not torch.equal(rank0[0][0], rank1[0][0])


def test_batch_seed_fits_torch_and_separates_its_parts():
    seeds = {batch_seed(*parts) for parts in [(1, 0, 0, 0, 1), (1, 0, 0, 1, 0), (1, 0, 1, 0, 0), (1, 1, 0, 0, 0)]}
    assert len(seeds) == 4  # the parts are not simply added
    for parts in [(0,), (1, 0, 5, 3, 9), (2**200, -(2**80), 1, 2, 3)]:
        seed = batch_seed(*parts)
        assert 0 <= seed < 2**63
        torch.Generator().manual_seed(seed)  # does not raise
