"""Train and eval loaders over webdataset shards: builders, the loader wrapper, and bad-data accounting."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from pace.data.device_augment import DeviceStage
from pace.data.info import ShardSet, check_local_shards, resolve_shards
from pace.data.lost import lost_samples
from pace.data.pipeline import BatchReport, ShardDataset, ShardReading, TrainSampling, train_quotas
from pace.data.shards import BadData
from pace.data.workers import check_sendable, init_worker, start_worker_server, worker_context
from pace.distributed import DistEnv
from pace.errors import RunError

logger = logging.getLogger(__name__)

_LOGGED_PER_EPOCH = 20  # bad samples logged one by one per epoch; the rest are summarised at its end


class TooMuchBadDataError(RunError):
    """More bad samples than the allowed fraction; the message names the counts and the first bad samples.

    A `RunError`: the data must be fixed, so the command line reports it as one line, not a traceback.
    """


@dataclass
class EpochStats:
    """What one rank read in one pass over its loader.

    Args:
        epoch: the epoch number.
        rank: the rank.
        batches: batches yielded.
        samples: raw samples consumed.
        decoded: images decoded.
        bad: samples and shards skipped.
        bad_by_kind: the same, counted by kind (`corrupt_image`, `missing_label`, `bad_shard` ...).
        first_bad: descriptions of the first bad items, naming shard and key.
        lost: samples the damaged shards' info-file counts promised and never gave (see `pace.data.lost`).
    """

    epoch: int = 0
    rank: int = 0
    batches: int = 0
    samples: int = 0
    decoded: int = 0
    bad: int = 0
    bad_by_kind: Counter = field(default_factory=Counter)
    first_bad: list[str] = field(default_factory=list)
    lost: int = 0

    @property
    def bad_samples(self) -> int:
        """Samples of the data missing from the epoch: skipped samples plus those lost in damaged shards."""
        return self.bad - self.bad_by_kind["bad_shard"] + self.lost

    def add(self, report: BatchReport) -> list[BadData]:
        """Count a batch's report; returns the bad items still to be logged one by one."""
        self.samples += report.samples
        self.decoded += report.decoded
        to_log = report.bad[: max(0, _LOGGED_PER_EPOCH - self.bad)]
        for item in report.bad:
            self.bad_by_kind[item.kind] += 1
            if len(self.first_bad) < _LOGGED_PER_EPOCH:
                self.first_bad.append(str(item))
        self.bad += len(report.bad)
        self.lost += lost_samples(item for item in report.bad if item.kind == "bad_shard")
        return to_log


@dataclass(frozen=True)
class LoaderIO:
    """What a `ShardLoader` needs besides its dataset.

    Args:
        num_workers: DataLoader worker processes.
        max_error_fraction: stop when more than this fraction of the samples are bad.
        expected_samples: raw samples this rank reads per epoch when known; lets the limit stop a run early.
        reading: how samples are read; its `pin_memory` and `prefetch_factor` (None: the DataLoader default) go
            to the DataLoader.
    """

    num_workers: int
    max_error_fraction: float
    expected_samples: int | None
    reading: ShardReading


class ShardLoader:
    """A DataLoader over a `ShardDataset` that yields `(images, targets)` in training and
    `(images, targets, keys)` in evaluation, counts bad data, and stops the run when there is too much.

    Create it with `create_train_loader` or `create_eval_loader`.

    Args:
        dataset: the per-worker pipeline.
        io: its worker count, the DataLoader's memory settings (`io.reading`) and the bad-data limit.
        stage: main-process batch stage of a deferred transform (decode and augment on the device), if any.
    """

    def __init__(self, dataset: ShardDataset, *, io: LoaderIO, stage: DeviceStage | None = None):
        if not 0.0 <= io.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1], got {io.max_error_fraction}")
        self.dataset = dataset
        self.max_error_fraction = io.max_error_fraction
        self.expected_samples = io.expected_samples
        self.stage = stage
        self.stats = EpochStats(rank=dataset.rank)
        if io.num_workers > 0:
            check_sendable(dataset)
        self._loader = DataLoader(
            dataset,
            batch_size=None,  # workers yield whole batches
            num_workers=io.num_workers,
            pin_memory=io.reading.pin_memory,
            prefetch_factor=io.reading.prefetch_factor if io.num_workers > 0 else None,
            persistent_workers=False,  # each epoch's workers must see the epoch and start batch set here
            # The DataLoader draws a base seed per iteration (unused here) from this generator, not the global one.
            generator=torch.Generator().manual_seed(0),
            # Workers come from a fork server, never from forking this threaded process (see pace.data.workers).
            multiprocessing_context=worker_context() if io.num_workers > 0 else None,
            worker_init_fn=init_worker if io.num_workers > 0 else None,
        )

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def start_batch(self) -> int:
        return self.dataset.start_batch

    @property
    def batches_per_epoch(self) -> int | None:
        """Training: batches per rank in a full epoch (the same on every rank). Evaluation: this rank's batches
        when the shard lengths are known, else None."""
        if self.dataset.train:
            return self.dataset.batches_per_epoch
        return self.dataset.eval_batches_for_rank()

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Choose the epoch the next iteration yields, and the batch it starts at (to resume mid-epoch).

        Args:
            epoch: epoch number; with the seed it fixes shard order, shuffle and augmentation.
            start_batch: first batch to yield; the batches before it are skipped without decoding.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if start_batch < 0 or (self.dataset.train and start_batch > self.dataset.batches_per_epoch):
            raise ValueError(f"start_batch {start_batch} outside [0, {self.dataset.batches_per_epoch}]")
        if start_batch and not self.dataset.train:
            raise ValueError("start_batch is for training loaders; evaluation always reads everything")
        self.dataset.epoch = epoch
        self.dataset.start_batch = start_batch

    def __len__(self) -> int:
        """Batches the next iteration yields (training: batches_per_epoch - start_batch)."""
        total = self.batches_per_epoch
        if total is None:
            raise TypeError("this eval loader's length is unknown: its shards have no sample counts (no _info.json)")
        return total - self.start_batch

    def __iter__(self) -> Iterator[tuple]:
        stats = self.stats = EpochStats(epoch=self.epoch, rank=self.dataset.rank)
        if self._loader.num_workers > 0:
            start_worker_server()  # restarts a server that died, as `worker_context` starts one
        batches = iter(self._loader)
        if self.stage is not None:  # decode failures on the device join the batch's report
            batches = self.stage.run(batches, epoch=self.epoch, start_batch=self.start_batch)
        for *batch, report in batches:
            for item in stats.add(report):
                logger.warning("skipped %s", item)
            self._check(stats, final=False)
            if batch[0] is None:  # an evaluation worker's closing report, no data
                continue
            stats.batches += 1
            last_training_batch = self.dataset.train and stats.batches == len(self)
            if last_training_batch:  # the Trainer takes exactly len(self) batches and never asks past the last
                self._close_epoch(stats)
            yield tuple(batch)
        if not (self.dataset.train and stats.batches == len(self)):
            self._close_epoch(stats)

    def _close_epoch(self, stats: EpochStats) -> None:
        """The end-of-epoch check and summary, with the epoch's real sample count when shards came up short."""
        self._check(stats, final=True)
        if stats.lost:
            planned = self._final_total(stats)
            logger.warning(
                "epoch %d rank %d: %d samples of the data lost in damaged or short shards; the epoch held %d of "
                "its %d planned samples%s",
                *(stats.epoch, stats.rank, stats.lost, max(0, planned - stats.bad_samples), planned),
                " (its batches are filled by re-reading the rest)" if self.dataset.train else "",
            )
        if stats.bad:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(stats.bad_by_kind.items()))
            logger.warning(
                "epoch %d rank %d: skipped %d of %d samples (%s)",
                *(stats.epoch, stats.rank, stats.bad, stats.samples, kinds),
            )
        else:
            logger.info("epoch %d rank %d: %d samples, no bad data", stats.epoch, stats.rank, stats.samples)

    def _final_total(self, stats: EpochStats) -> int:
        """The samples this pass was meant to hold: training readers top up what was lost, so their read count
        is already the planned one; an evaluation pass reads each sample once, and the lost ones never."""
        return stats.samples if self.dataset.train else stats.samples + stats.lost

    def _check(self, stats: EpochStats, *, final: bool) -> None:
        total = self._final_total(stats) if final else self.expected_samples
        bad = stats.bad_samples
        if not bad or total is None or bad <= self.max_error_fraction * max(total, 1):
            return
        shown = "\n  ".join(stats.first_bad[:5])
        lost = f", {stats.lost} of them lost in damaged or short shards" if stats.lost else ""
        raise TooMuchBadDataError(
            f"too much bad data in epoch {stats.epoch} on rank {stats.rank}: {bad} bad of "
            f"{stats.samples} samples read{'' if final else f' (of {total} planned)'}{lost}, above "
            f"max_error_fraction={self.max_error_fraction}; counts {dict(stats.bad_by_kind)}; first:\n  {shown}"
        )


def create_train_loader(
    source: str | Sequence[str],
    *,
    batch_size: int,
    transform: Callable,
    env: DistEnv | None = None,
    sampling: TrainSampling | None = None,
    reading: ShardReading | None = None,
    split: str = "train",
    num_workers: int = 4,
    num_samples: int | None = None,
    batch_transform: Callable | None = None,
    max_error_fraction: float = 0.01,
    epoch: int = 0,
    start_batch: int = 0,
) -> ShardLoader:
    """Training loader: shuffled, deterministic, resumable, the same number of full batches on every rank.

    Args:
        source: shard directory (with `_info.json`, or timm/imagenet-1k-wds shards), brace pattern(s), list
            file, or list of URLs; see `resolve_shards`.
        batch_size: samples per batch on this rank (every batch is full).
        transform: per-image transform, PIL image -> tensor (`create_train_transform`), or a deferred transform
            (`create_device_train_transform`) whose batch stage decodes and augments in the main process.
        env: this process's place in the job (default: a single process).
        sampling: how the epoch draws its samples (default: `TrainSampling()`).
        reading: how samples are read and checked (default: `ShardReading()`).
        split: split name in the info file.
        num_workers: DataLoader worker processes (0: read in the main process). Part of the epoch's definition:
            resume with the same value.
        num_samples: samples in the split; default: from the info file or the published ImageNet counts.
        batch_transform: `(images, targets) -> (images, targets)` run on each batch under a per-batch seed, e.g.
            `create_mixup(...)`; part of the deterministic epoch (in the worker, or on the device after a deferred
            transform).
        max_error_fraction: stop with `TooMuchBadDataError` when more of the epoch's samples are bad.
        epoch: first epoch to yield (change it with `set_epoch`).
        start_batch: batch of `epoch` to start at, to resume mid-epoch.
    """
    env, sampling, reading = env or DistEnv(), sampling or TrainSampling(), reading or ShardReading()
    shards = _open_shards(source, env, split, num_samples)
    batches = _train_batches(shards, source, env, batch_size, num_workers, sampling)
    if batch_transform is not None and batch_size % 2:
        raise ValueError(f"Mixup/CutMix pair samples within a batch: batch_size must be even, got {batch_size}")
    workers = max(1, num_workers)
    raw_samples = sum(train_quotas(batches, workers, batch_size, sampling.repeated_aug))  # bad data aside
    stage = None
    if hasattr(transform, "make_stage"):  # a deferred transform: the batch transform runs on the device
        stage = transform.make_stage(train=True, seed=sampling.seed, rank=env.rank, mixup=batch_transform)
        batch_transform = None
    loader = _make_loader(
        shards,
        io=LoaderIO(num_workers, max_error_fraction, raw_samples, reading),
        stage=stage,
        train=True,
        transform=transform,
        batch_size=batch_size,
        rank=env.rank,
        world_size=env.world_size,
        batches_per_epoch=batches,
        sampling=sampling,
        batch_transform=batch_transform,
    )
    loader.set_epoch(epoch, start_batch=start_batch)
    return loader


def _train_batches(
    shards: ShardSet, source: object, env: DistEnv, batch_size: int, num_workers: int, sampling: TrainSampling
) -> int:
    """Batches per epoch on every rank, after checking that the epoch can be planned over these shards."""
    if shards.num_samples is None and sampling.samples_per_epoch is None:
        raise ValueError(
            f"the number of samples in {source!r} is unknown: pass num_samples= (or TrainSampling(samples_per_epoch=)),"
            " or write the shards with pace-make-shards, which records it in _info.json"
        )
    epoch_samples = sampling.samples_per_epoch if sampling.samples_per_epoch is not None else shards.num_samples
    workers, global_workers = max(1, num_workers), env.world_size * max(1, num_workers)
    if not sampling.resampled and len(shards.urls) < global_workers:
        raise ValueError(
            f"{len(shards.urls)} shards cannot be split over {env.world_size} ranks x {workers} workers = "
            f"{global_workers} readers in one-pass mode: use TrainSampling(resampled=True), fewer workers, or write "
            "smaller shards"
        )
    return math.ceil(epoch_samples / (env.world_size * batch_size))


def create_eval_loader(
    source: str | Sequence[str],
    *,
    batch_size: int,
    transform: Callable,
    env: DistEnv | None = None,
    reading: ShardReading | None = None,
    split: str = "val",
    num_workers: int = 4,
    num_samples: int | None = None,
    max_error_fraction: float = 0.01,
) -> ShardLoader:
    """Evaluation loader: every sample exactly once over all ranks and workers, with its key.

    Yields `(images, targets, keys)`; ranks may yield different numbers of batches (gather the results, do
    not pad), and the last batch of each worker may be partial. Bad samples are skipped and counted.

    Args:
        source: as for `create_train_loader`.
        batch_size: samples per batch (at most).
        transform: per-image transform (`create_eval_transform`), or `create_device_eval_transform`'s.
        env: this process's place in the job (default: a single process).
        reading: how samples are read and checked (default: `ShardReading()`).
        split: split name in the info file.
        num_workers: DataLoader worker processes.
        num_samples: samples in the split, when no info file says (used for the error limit only).
        max_error_fraction: stop with `TooMuchBadDataError` when more of the samples are bad.
    """
    env, reading = env or DistEnv(), reading or ShardReading()
    shards = _open_shards(source, env, split, num_samples)
    expected = math.ceil(shards.num_samples / env.world_size) if shards.num_samples else None
    return _make_loader(
        shards,
        io=LoaderIO(num_workers, max_error_fraction, expected, reading),
        stage=transform.make_stage(train=False, seed=0, rank=env.rank) if hasattr(transform, "make_stage") else None,
        train=False,
        transform=transform,
        batch_size=batch_size,
        rank=env.rank,
        world_size=env.world_size,
    )


def _make_loader(shards: ShardSet, *, io: LoaderIO, stage: DeviceStage | None = None, **dataset_options) -> ShardLoader:
    dataset = ShardDataset(shards, num_workers=io.num_workers, reading=io.reading, **dataset_options)
    return ShardLoader(dataset, io=io, stage=stage)


def _open_shards(source: str | Sequence[str], env: DistEnv, split: str, num_samples: int | None) -> ShardSet:
    """The shards of `split`, after checking this process's place and that local shard files exist."""
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank {env.rank} is not in a world of size {env.world_size}")
    shards = resolve_shards(source, split=split, num_samples=num_samples)
    check_local_shards(shards.urls)
    return shards
