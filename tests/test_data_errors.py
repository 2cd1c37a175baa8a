"""Bad data: corrupt images, missing members, truncated tars are skipped, named, counted; too many stop the run."""

from __future__ import annotations

import gzip
import logging
import shutil
from itertools import islice

import pytest
import torch
from data_helpers import batches_equal, fixed_transform, jpeg_bytes, random_transform, write_tar

from pace.data import TooMuchBadDataError, TrainSampling, create_eval_loader, create_train_loader, read_info
from pace.data.info import write_info
from pace.data.shards import read_shard

GOOD_PER_SHARD = 10


@pytest.fixture()
def damaged(tmp_path):
    """4 shards of 10 good samples plus damage: shard 1 holds a garbage JPEG, a truncated JPEG, a sample without
    label and one without image; shard 2 is cut in the middle of a member; shard 3 ends early at a member boundary
    (only the info file's count can tell). Returns (directory, keys of all good samples that can be read)."""
    out = tmp_path / "shards"
    out.mkdir()
    good: dict[int, list[str]] = {}
    for shard in range(4):
        samples = [
            {"__key__": f"s{shard}_{i:03d}", "jpg": jpeg_bytes(shard * 100 + i), "cls": str(i % 3).encode()}
            for i in range(GOOD_PER_SHARD)
        ]
        if shard == 1:
            samples[2:2] = [
                {"__key__": "garbage", "jpg": b"\xff\xd8 definitely not a jpeg", "cls": b"1"},
                {"__key__": "truncated", "jpg": jpeg_bytes(999)[:80], "cls": b"2"},
                {"__key__": "nolabel", "jpg": jpeg_bytes(998)},
                {"__key__": "noimage", "cls": b"0"},
            ]
        write_tar(out / f"d-{shard}.tar", samples)
        good[shard] = [s["__key__"] for s in samples if s["__key__"].startswith("s")]
    # Shard 2: cut inside the 6th sample's image data; samples 0-4 remain readable.
    data = (out / "d-2.tar").read_bytes()
    cut = data.index(b"s2_005.jpg") + 512 + 100
    (out / "d-2.tar").write_bytes(data[:cut])
    good[2] = good[2][:5]
    # Shard 3: the last 3 samples (6 members of 1024+ bytes each) dropped cleanly at a header boundary.
    data = (out / "d-3.tar").read_bytes()
    (out / "d-3.tar").write_bytes(data[: data.index(b"s3_007.jpg")])
    good[3] = good[3][:7]
    lengths = [GOOD_PER_SHARD, GOOD_PER_SHARD + 4, GOOD_PER_SHARD, GOOD_PER_SHARD]
    info = {"classes": ["a", "b", "c"], "splits": {"train": _entry(lengths)}}
    write_info(out, info)
    return out, sorted(k for keys in good.values() for k in keys)


def _entry(lengths):
    return {
        "name": "train",
        "num_samples": sum(lengths),
        "filenames": [f"d-{i}.tar" for i in range(4)],
        "shard_lengths": lengths,
    }


def test_eval_skips_names_and_counts_bad_data_across_workers(damaged, caplog):
    out, good = damaged
    loader = create_eval_loader(
        out, split="train", batch_size=4, transform=fixed_transform(), num_workers=2, max_error_fraction=0.5
    )
    with caplog.at_level(logging.WARNING, logger="pace.data"):
        keys = sorted(key for _, _, batch in loader for key in batch)
    assert keys == good  # every readable good sample exactly once
    stats = loader.stats
    assert dict(stats.bad_by_kind) == {"corrupt_image": 2, "missing_label": 1, "missing_image": 1, "bad_shard": 2}
    assert stats.bad == 6
    text = caplog.text
    for shard, key in [
        ("d-1.tar", "garbage"),
        ("d-1.tar", "truncated"),
        ("d-1.tar", "nolabel"),
        ("d-1.tar", "noimage"),
    ]:
        assert f"shard {out / shard} key {key}" in text
    assert f"shard {out / 'd-2.tar'} key s2_004: damaged tar data after 5 samples" in text
    assert "shard ended after 7 of 10 samples (truncated)" in text
    assert "skipped 6 of" in text  # the end-of-epoch summary


def test_train_keeps_batch_count_and_resumes_exactly_over_bad_data(damaged):
    out, _ = damaged
    kwargs = {
        "batch_size": 4,
        "transform": random_transform(),
        "sampling": TrainSampling(seed=3),
        "max_error_fraction": 0.5,
    }
    full = list(create_train_loader(out, num_workers=2, **kwargs))
    assert len(full) == 11  # ceil(44 / 4): bad samples are replaced, not dropped
    assert all(len(targets) == 4 for _, targets in full)
    for k in (2, 5, 9):
        assert batches_equal(list(create_train_loader(out, num_workers=2, start_batch=k, **kwargs)), full[k:])


def test_repeated_augmentation_repeats_the_plain_stream_over_bad_data_and_counts_the_same_damage(damaged):
    out, _ = damaged
    kwargs = {"batch_size": 4, "max_error_fraction": 0.5, "transform": fixed_transform(), "num_workers": 0}
    repeats = {"sampling": TrainSampling(seed=3, repeated_aug=3, samples_per_epoch=3 * 44)}
    # One reader takes the same 44 raw samples either way: 11 batches plain, 33 with each sample in 3 slots.
    plain = create_train_loader(out, sampling=TrainSampling(seed=3), **kwargs)
    repeated = create_train_loader(out, **repeats, **kwargs)
    plain_images, plain_targets = map(torch.cat, zip(*plain))
    images, targets = map(torch.cat, zip(*repeated))
    # A bad sample's slots hold copies of the next usable sample, as without repeats.
    assert torch.equal(images, plain_images.repeat_interleave(3, dim=0))
    assert torch.equal(targets, plain_targets.repeat_interleave(3))
    assert repeated.stats.bad_by_kind == plain.stats.bad_by_kind
    assert {"corrupt_image", "missing_label", "missing_image", "bad_shard"} <= set(repeated.stats.bad_by_kind)
    assert repeated.stats.samples == plain.stats.samples == 44
    # Resuming at every batch gives the same batches, also where the cut group is a bad sample's replacement
    # (raw sample g fills slots 3g..3g+2; a replaced one holds the same image as the next).
    replaced = [g for g in range(43) if torch.equal(plain_images[g], plain_images[g + 1])]
    assert any((3 * g) // 4 != (3 * g + 2) // 4 for g in replaced)
    batches = list(zip(images.split(4), targets.split(4)))
    for k in range(1, 33):
        assert batches_equal(list(create_train_loader(out, start_batch=k, **repeats, **kwargs)), batches[k:]), k
    kwargs.update(repeats, transform=random_transform(), num_workers=2)
    full = list(create_train_loader(out, **kwargs))
    assert len(full) == 33 and all(len(t) == 4 for _, t in full)
    for k in (1, 2, 5):
        assert batches_equal(list(create_train_loader(out, start_batch=k, **kwargs)), full[k:]), k


def test_too_much_bad_data_stops_with_a_clear_message(damaged):
    out, _ = damaged
    loader = create_eval_loader(
        out, split="train", batch_size=4, transform=fixed_transform(), num_workers=0, max_error_fraction=0.05
    )
    with pytest.raises(TooMuchBadDataError, match=r"too much bad data in epoch 0 on rank 0: \d+ bad of \d+ samples"):
        list(loader)
    train = create_train_loader(
        out,
        batch_size=4,
        transform=fixed_transform(),
        num_workers=2,
        max_error_fraction=0.05,
        sampling=TrainSampling(shuffle_buffer=0),
    )
    with pytest.raises(TooMuchBadDataError, match="max_error_fraction=0.05"):
        list(train)


def test_a_shard_missing_at_read_time_is_a_clear_error(damaged):
    out, _ = damaged
    loader = create_eval_loader(
        out, split="train", batch_size=4, transform=fixed_transform(), num_workers=0, max_error_fraction=0.5
    )
    shutil.move(out / "d-2.tar", out / "moved.tar")
    with pytest.raises(OSError, match="shard not found: .*d-2.tar"):
        list(loader)
    assert read_info(out)["splits"]["train"]["num_samples"] == 44


def test_damage_that_tar_reads_as_the_end_is_found_without_sample_counts(tmp_path):
    # Python's tarfile ends an archive quietly at a cut or garbled header; no info file gives counts here.
    def shard(name, prefix, count, size=(20, 16)):
        samples = [{"__key__": f"{prefix}_{i:03d}", "jpg": jpeg_bytes(i, size=size), "cls": b"1"} for i in range(count)]
        return write_tar(tmp_path / name, samples).read_bytes()

    whole = shard("whole.tar", "w", 6)
    data = shard("cut.tar", "c", 6)
    (tmp_path / "cut.tar").write_bytes(data[: data.index(b"c_004.jpg") + 200])  # inside a header
    data = shard("boundary.tar", "b", 6)
    (tmp_path / "boundary.tar").write_bytes(data[: data.index(b"b_003.jpg")])
    data = bytearray(shard("garbled.tar", "g", 40, size=(64, 64)))  # larger than a pipe's buffer
    data[data.index(b"g_005.jpg") + 3] ^= 0x20  # the header checksum no longer matches
    (tmp_path / "garbled.tar").write_bytes(data)
    (tmp_path / "whole.tar.gz").write_bytes(gzip.compress(whole))  # webdataset reads compressed tars too
    sources = [tmp_path / "whole.tar", tmp_path / "cut.tar", tmp_path / "boundary.tar", tmp_path / "whole.tar.gz"]
    sources = [str(path) for path in sources] + [f"pipe:cat {tmp_path / 'garbled.tar'}"]

    loader = create_eval_loader(
        sources, batch_size=4, transform=fixed_transform(), num_workers=0, num_samples=62, max_error_fraction=0.5
    )
    keys = sorted(key for _, _, batch in loader for key in batch)
    expected = [f"w_{i:03d}" for i in range(6)] * 2 + [f"c_{i:03d}" for i in range(4)]
    expected += [f"b_{i:03d}" for i in range(3)] + [f"g_{i:03d}" for i in range(5)]
    assert keys == sorted(expected)
    assert dict(loader.stats.bad_by_kind) == {"bad_shard": 3}
    found = "\n".join(loader.stats.first_bad)
    assert (
        f"shard {tmp_path / 'cut.tar'} key c_003: damaged tar data after 4 samples (no end-of-archive marker" in found
    )
    assert f"shard {tmp_path / 'boundary.tar'} key b_002: damaged tar data after 3 samples (no end-of-archive" in found
    assert f"shard pipe:cat {tmp_path / 'garbled.tar'} key g_004: damaged tar data after 5 samples (unreadable" in found


@pytest.mark.parametrize("split", [3, 7])
def test_readers_sharing_a_damaged_shard_record_the_damage_once(damaged, split):
    # One-pass training splits shards between readers; the one whose part holds the damage records it.
    out, good = damaged
    for shard, readable, expected in [("d-2.tar", 5, None), ("d-3.tar", 7, 10)]:
        bad, keys = [], []
        url = str(out / shard)
        keys += [s["__key__"] for s in islice(read_shard(url, bad=bad, expected=expected), split)]
        keys += [s["__key__"] for s in read_shard(url, bad=bad, expected=expected, skip=split)]
        assert keys == [key for key in good if key.startswith(f"s{shard[2]}_")][:readable]
        assert len(bad) == 1 and bad[0].kind == "bad_shard" and bad[0].key == keys[-1]
