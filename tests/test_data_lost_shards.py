"""Empty and truncated shards: their lost samples, counted from `_info.json`, weigh against the bad-data limit."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import pytest
from data_helpers import fixed_transform, jpeg_bytes, write_tar

from pace.data import (
    TooMuchBadDataError,
    TrainSampling,
    create_eval_loader,
    create_train_loader,
    make_quickstart_dataset,
    read_info,
)
from pace.data.info import write_info
from pace.distributed import DistEnv

PER_SHARD = 10


def _half_lost(out: Path, per_shard: int) -> list[str]:
    """8 shards of `per_shard` samples by `_info.json`; shards 0 and 5 are 0 bytes, shard 2 is cut inside its 5th
    sample's image (4 readable), shard 6 ends cleanly after `per_shard - 3` samples. Returns the readable keys."""
    out.mkdir()
    readable = []
    for shard in range(8):
        samples = [
            {"__key__": f"s{shard}_{i:03d}", "jpg": jpeg_bytes(shard * 1000 + i), "cls": str(i % 3).encode()}
            for i in range(per_shard)
        ]
        path = write_tar(out / f"h-{shard}.tar", samples)
        data = path.read_bytes()
        keep = per_shard
        if shard in (0, 5):
            path.write_bytes(b"")
            keep = 0
        elif shard == 2:
            path.write_bytes(data[: data.index(b"s2_004.jpg") + 512 + 100])
            keep = 4
        elif shard == 6:
            keep = per_shard - 3
            path.write_bytes(data[: data.index(f"s6_{keep:03d}.jpg".encode())])
        readable += [s["__key__"] for s in samples[:keep]]
    entry = {
        "name": "train",
        "num_samples": 8 * per_shard,
        "filenames": [f"h-{i}.tar" for i in range(8)],
        "shard_lengths": [per_shard] * 8,
    }
    write_info(out, {"classes": ["a", "b", "c"], "splits": {"train": entry}})
    return sorted(readable)


@pytest.fixture()
def half_lost(tmp_path):
    """`_half_lost` with 10 samples a shard: (directory, readable keys)."""
    return tmp_path / "shards", _half_lost(tmp_path / "shards", PER_SHARD)


LOST = 10 + 10 + 6 + 3  # samples the info file promised that cannot be read


def test_training_over_half_lost_shards_stops_naming_the_loss(tmp_path):
    # 100 samples a shard: as 4 bad items of 800 samples the damage was within the default 1% and the epoch
    # went on re-reading the other half of the data; as samples it is 299 of 800.
    out = tmp_path / "shards"
    _half_lost(out, 100)
    loader = create_train_loader(
        out, batch_size=8, transform=fixed_transform(), num_workers=2, sampling=TrainSampling(seed=1)
    )
    with pytest.raises(TooMuchBadDataError) as caught:
        list(islice(iter(loader), len(loader)))
    message = str(caught.value)
    assert "of them lost in damaged or short shards" in message
    assert "max_error_fraction=0.01" in message
    assert str(out / "h-0.tar") in message or str(out / "h-5.tar") in message
    assert loader.stats.batches < len(loader)  # stopped when the loss was reported, not at the epoch's end


def test_training_within_the_limit_reports_the_real_sample_count(half_lost, caplog):
    out, readable = half_lost
    loader = create_train_loader(
        out,
        batch_size=8,
        transform=fixed_transform(),
        num_workers=2,
        sampling=TrainSampling(seed=1),
        max_error_fraction=0.5,
    )
    with caplog.at_level(logging.INFO, logger="pace.data"):
        # As the Trainer does: exactly len(loader) batches, never a request past the last one.
        batches = list(islice(iter(loader), len(loader)))
    assert len(batches) == 10 and all(len(targets) == 8 for _, targets in batches)
    stats = loader.stats
    assert stats.lost == LOST  # each damaged shard once, though its reader re-reads its share to fill the epoch
    assert stats.bad_by_kind["bad_shard"] == 4
    assert stats.bad_samples == LOST
    assert f"the epoch held {len(readable)} of its 80 planned samples" in caplog.text
    strict = create_train_loader(
        out,
        batch_size=8,
        transform=fixed_transform(),
        num_workers=0,
        sampling=TrainSampling(seed=1),
        max_error_fraction=0.3,
    )
    with pytest.raises(TooMuchBadDataError, match=f"{LOST} bad of"):  # 29 of 80 is above 30% only as samples
        list(islice(iter(strict), len(strict)))


def test_evaluation_counts_the_lost_samples_once(half_lost, caplog):
    out, readable = half_lost
    for workers in (0, 2):
        loader = create_eval_loader(
            out, split="train", batch_size=4, transform=fixed_transform(), num_workers=workers, max_error_fraction=0.5
        )
        with caplog.at_level(logging.INFO, logger="pace.data"):
            keys = sorted(key for _, _, batch in loader for key in batch)
        assert keys == readable
        assert loader.stats.lost == LOST
        assert f"the epoch held {len(readable)} of its 80 planned samples" in caplog.text
        caplog.clear()
    loader = create_eval_loader(
        out, split="train", batch_size=4, transform=fixed_transform(), num_workers=0, max_error_fraction=0.3
    )
    with pytest.raises(
        TooMuchBadDataError, match=r"\d+ bad of \d+ samples read \(of 80 planned\), \d+ of them lost in damaged"
    ):
        list(loader)


def test_ranks_sharing_a_damaged_shard_split_its_loss(half_lost):
    # More readers than shards: each shard's readers take interleaved samples and each reads the shard to its end.
    out, readable = half_lost
    sources = [str(out / "h-2.tar"), str(out / "h-6.tar")]
    lost, keys = 0, []
    for rank in range(4):
        loader = create_eval_loader(
            sources,
            batch_size=4,
            transform=fixed_transform(),
            num_workers=0,
            env=DistEnv(rank=rank, world_size=4),
            max_error_fraction=1,
        )
        keys += [key for _, _, batch in loader for key in batch]
        lost += loader.stats.lost
    assert sorted(keys) == [key for key in readable if key[:2] in ("s2", "s6")]
    assert lost == 6 + 3


@pytest.mark.slow
def test_pace_train_over_half_empty_shards_exits_non_zero_naming_the_loss(tmp_path):
    # The reported case end to end: 4 of 8 training shards empty, where training used to exit 0.
    from train_helpers import make_tiny_shards, run_train

    root = tmp_path / "shapes"
    overrides = make_tiny_shards(root)  # its overrides; the dataset is then written again, larger
    make_quickstart_dataset(root, image_size=32, train_per_class=50, val_per_class=4, shard_size=63, workers=1)
    info = read_info(root)
    assert len(info["splits"]["train"]["filenames"]) == 8
    for name in info["splits"]["train"]["filenames"][::2]:
        (root / name).write_bytes(b"")
    result = run_train(tmp_path / "run", *overrides, timeout=600, full_errors=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("pace-train: error: too much bad data in epoch 0")
    assert "of them lost in damaged or short shards" in result.stderr
