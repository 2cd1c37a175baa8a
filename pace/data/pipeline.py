"""The streaming pipeline inside each DataLoader worker: shards -> raw samples -> decoded, augmented batches.

Training epochs are a pure function of (seed, epoch, rank, world_size, num_workers):

* batch `b` of a rank's epoch belongs to logical worker `b % num_workers` and is that worker's `b // num_workers`-th
  batch (the DataLoader takes batches from its workers round-robin, so this is also the order they come out);
* logical worker `l` of rank `r` is global worker `g = r * num_workers + l` of `G = world_size * num_workers`; it
  reads its run of the samples of a shard order shuffled by (seed, epoch) (`train_assignment`; the whole shards
  `order[g::G]` when the shard lengths are unknown), or, resampled, shards drawn with replacement by
  (seed, epoch, g); a worker whose share runs out goes on with a reshuffle of its own share;
* its raw samples go through a shuffle buffer seeded by (seed, epoch, g); each sample of that shuffled stream
  fills `repeats` consecutive slots of the worker's slot stream (repeated augmentation; 1 slot when off), and
  batch `j` of the worker is the window of slots `[j * B, (j + 1) * B)`: the copies of a sample share a batch,
  except a group cut by a window's end, which finishes in the worker's next batch;
* the augmentation of slot `i` of window `j` runs under the Python, NumPy and torch RNGs seeded with `s_j + i`,
  where `s_j` is derived from (seed, epoch, g, j); a batch transform such as Mixup runs under a seed derived from
  (seed, epoch, rank, b). Each sample's augmentation therefore depends only on its own image and place, not on
  how many random numbers the samples before it drew, and each copy of a repeated sample gets its own.

Resuming at batch `k` therefore only has to drop the first raw samples of each worker's stream (those whose
slots all lie in earlier batches), before decoding them. A sample that cannot be used is replaced by the next
usable sample of the same stream, so the windows, and every later batch, stay where they were.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count, islice

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from pace.data.device_augment import EncodedImage
from pace.data.info import ShardSet
from pace.data.jpeg_check import jpeg_size
from pace.data.lost import OncePerShard, shared_loss
from pace.data.options import IMAGE_KEYS, ShardReading, TrainSampling  # noqa: F401  (IMAGE_KEYS: re-exported)
from pace.data.shards import BadData, read_shard

# Tags that keep the seeds of different random streams apart.
_ORDER, _RESAMPLE, _SHUFFLE, _SAMPLE, _BATCH = range(5)
# How far ahead a bad sample's replacement is searched before the run is stopped.
_MAX_CONSECUTIVE_BAD = 1000


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of integers, the same on every platform and Python version."""
    digest = hashlib.blake2b(b",".join(b"%d" % p for p in parts), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@dataclass
class BatchReport:
    """What a worker read and skipped while making one batch; travels with the batch to the main process.

    Args:
        samples: raw samples consumed.
        decoded: images decoded.
        bad: the samples and shards skipped.
    """

    samples: int = 0
    decoded: int = 0
    bad: list[BadData] = field(default_factory=list)


class ShardDataset(IterableDataset):
    """Iterable over whole batches, `(images, targets, report)` in training, `(images, targets, keys, report)` in
    evaluation; an evaluation worker ends with a `(None, None, None, report)` item when it has unreported data.

    Build it through `pace.data.create_train_loader` / `create_eval_loader`, which wrap it in a DataLoader.

    Args:
        shards: the shard list and its counts.
        train: training (shuffled, fixed batch count, full batches) or evaluation (each sample once, in order).
        transform: image transform, PIL image -> tensor.
        batch_size: samples per batch.
        num_workers: DataLoader workers (0: the main process reads).
        rank: this process's rank.
        world_size: number of ranks.
        batches_per_epoch: training batches per rank and epoch.
        sampling: how training draws its samples (its `samples_per_epoch` is already in `batches_per_epoch`).
        batch_transform: applied to each training batch, `(images, targets) -> (images, targets)` (timm Mixup).
        reading: the tar members to read and the label check (its `pin_memory` and `prefetch_factor` are the
            DataLoader's).
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        train: bool,
        transform: Callable,
        batch_size: int,
        num_workers: int,
        rank: int,
        world_size: int,
        batches_per_epoch: int = 0,
        sampling: TrainSampling = TrainSampling(),
        batch_transform: Callable | None = None,
        reading: ShardReading = ShardReading(),
    ):
        super().__init__()
        self.shards = shards
        self.train = train
        self.transform = transform
        self.batch_size = batch_size
        self.workers = max(1, num_workers)
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = batches_per_epoch
        self.sampling = sampling
        self.batch_transform = batch_transform
        self.reading = reading
        self.epoch = 0
        self.start_batch = 0
        lengths = shards.shard_lengths
        self._expected = dict(zip(shards.urls, lengths)) if lengths is not None else {}

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"dataset built for {self.workers} workers runs in {workers}")
        if self.train:
            return self._train_batches(worker, in_main_process=info is None)
        return self._eval_batches(worker)

    # -- training --------------------------------------------------------------------------------------------

    def _train_batches(self, worker: int, in_main_process: bool) -> Iterator[tuple]:
        W, B, R, k = self.workers, self.batch_size, self.sampling.repeated_aug, self.start_batch
        first = k + worker  # this physical worker yields batches first, first + W, ... of the epoch
        if first >= self.batches_per_epoch:
            return
        logical = first % W
        g, G = self.rank * W + logical, self.world_size * W
        bad: list[BadData] = []
        raw = self._train_raw(g, G, bad)
        filled = (first // W) * B  # slots of this worker's earlier batches
        deque(islice(raw, filled // R), maxlen=0)  # samples used up by earlier batches: read, never decoded
        bad.clear()  # damage met among them was reported with those batches
        stream = _Lookahead(raw, self._decode, bad)
        slots = _Repeated(stream, R, used=filled % R)
        collate = getattr(self.transform, "collate", default_collate)  # deferred transforms batch their own way
        for b in range(first, self.batches_per_epoch, W):
            window_seed = derive_seed(self.sampling.seed, self.epoch, G, g, _SAMPLE, b // W)
            with _preserve_global_rng(in_main_process):
                images, targets = [], []
                for slot in range(B):
                    image, label, _ = slots.take()
                    _seed_everything((window_seed + slot) & 0xFFFFFFFF)  # one hash per batch, not per sample
                    images.append(self.transform(image))
                    targets.append(label)
                images, targets = collate(images), torch.tensor(targets, dtype=torch.long)
                if self.batch_transform is not None:
                    _seed_everything(derive_seed(self.sampling.seed, self.epoch, G, self.rank, _BATCH, b))
                    images, targets = self.batch_transform(images, targets)
            yield images, targets, _take_report(slots.pop_taken(), bad, decoded=stream.pop_decoded())

    def _train_raw(self, g: int, G: int, bad: list[BadData]) -> Iterator[dict]:
        """Endless shuffled raw samples of global worker g: its share of the epoch's samples, then reshuffles of
        that share (each pass shuffled on its own, so the first pass is complete before the next begins);
        resampled, one endless pass over shards drawn with replacement."""
        count_of_shards = len(self.shards.urls)
        if self.sampling.resampled:
            draw = random.Random(derive_seed(self.sampling.seed, self.epoch, G, g, _RESAMPLE))
            passes: Iterator = iter([((draw.randrange(count_of_shards), 0, None) for _ in count())])
        else:
            order = list(range(count_of_shards))
            random.Random(derive_seed(self.sampling.seed, self.epoch, _ORDER)).shuffle(order)
            if self.shards.shard_lengths is None:  # whole shards, strided: shares match quotas only roughly
                share = [(index, 0, None) for index in order[g::G]]
            else:
                share = train_assignment(self.shards.shard_lengths, order, self._quotas())[g]
                share = share or [(index, 0, None) for index in order]  # an empty run: top up from all
            passes = _reshuffled(share, derive_seed(self.sampling.seed, self.epoch, G, g, _ORDER))
        rng = random.Random(derive_seed(self.sampling.seed, self.epoch, G, g, _SHUFFLE))
        once = OncePerShard(bad)  # a reshuffled pass meets the same short shards again
        for shard_pass in passes:
            samples = self._read_pieces(shard_pass, once, f"training worker {g} of {G}")
            buffer = self.sampling.shuffle_buffer
            if buffer > 1:
                samples = wds.shuffle(buffer, min(self.sampling.shuffle_initial, buffer), rng=rng)(samples)
            yield from samples

    def _quotas(self) -> list[int]:
        """Raw samples each global worker turns into batches in an epoch without bad data."""
        return (
            train_quotas(self.batches_per_epoch, self.workers, self.batch_size, self.sampling.repeated_aug)
            * self.world_size
        )

    def _read_pieces(
        self, pieces: Iterable[tuple[int, int, int | None]], bad: OncePerShard, reader: str
    ) -> Iterator[dict]:
        read = empty = 0
        for index, start, stop in pieces:
            url, before = self.shards.urls[index], read
            samples = read_shard(
                url, bad=bad, expected=self._expected.get(url), timeout=self.reading.open_timeout, skip=start
            )
            try:
                for sample in islice(samples, None if stop is None else stop - start):
                    read += 1
                    yield sample
            finally:
                samples.close()
            empty = empty + 1 if read == before else 0
            if empty >= 100:
                raise RuntimeError(f"{reader} read no samples from 100 shards in a row, the last {url}")
        if not read:
            raise RuntimeError(f"{reader} read no samples from its shards")

    # -- evaluation ------------------------------------------------------------------------------------------

    def _eval_batches(self, worker: int) -> Iterator[tuple]:
        g, G = self.rank * self.workers + worker, self.world_size * self.workers
        bad: list[BadData] = []
        batch: list[tuple] = []
        read = 0
        for sample in self._eval_raw(g, G, bad):
            read += 1
            result = self._decode(sample)
            if isinstance(result, BadData):
                bad.append(result)
                continue
            image, label, key = result
            batch.append((self.transform(image), label, key))
            if len(batch) == self.batch_size:
                yield (*_collate_eval(batch, self.transform), _take_report(read, bad))
                batch, read = [], 0
        if batch:
            yield (*_collate_eval(batch, self.transform), _take_report(read, bad))
        elif read or bad:
            yield None, None, None, _take_report(read, bad)

    def _eval_raw(self, g: int, G: int, bad: list[BadData]) -> Iterator[dict]:
        for index, offset, stride in eval_assignment(len(self.shards.urls), g, G):
            url, found = self.shards.urls[index], []
            expected = self._expected.get(url)
            samples = read_shard(url, bad=found, expected=expected, timeout=self.reading.open_timeout)
            yield from islice(samples, offset, None, stride)
            bad.extend(shared_loss(found, offset=offset, stride=stride, expected=expected))

    def eval_batches_for_rank(self) -> int | None:
        """Evaluation batches this rank yields (None when the shard lengths are unknown)."""
        lengths = self.shards.shard_lengths
        if lengths is None:
            return None
        G, total = self.world_size * self.workers, 0
        for worker in range(self.workers):
            plan = eval_assignment(len(lengths), self.rank * self.workers + worker, G)
            count = sum(len(range(offset, lengths[index], stride)) for index, offset, stride in plan)
            total += -(-count // self.batch_size)
        return total

    # -- decoding --------------------------------------------------------------------------------------------

    def _decode(self, sample: dict) -> tuple[Image.Image, int, str] | BadData:
        key, url = sample["__key__"], sample["__url__"]
        reading = self.reading
        data = next((sample[k] for k in reading.image_keys if k in sample), None)
        if data is None:
            message = f"no {'/'.join(reading.image_keys)} member (members: {_members(sample)})"
            return BadData("missing_image", url, key, message)
        if reading.label_key not in sample:
            return BadData("missing_label", url, key, f"no {reading.label_key} member (members: {_members(sample)})")
        try:
            label = int(sample[reading.label_key])
        except ValueError:
            return BadData("bad_label", url, key, f"label {sample[reading.label_key][:20]!r} is not an integer")
        if reading.num_classes is not None and not 0 <= label < reading.num_classes:
            return BadData("bad_label", url, key, f"label {label} outside [0, {reading.num_classes})")
        encoded = getattr(self.transform, "takes_encoded", False)  # decoded by the transform or on the device
        size = jpeg_size(data) if encoded else None
        if size is not None:  # a JPEG's frame header read in a byte scan, a twentieth of Pillow's open
            return EncodedImage(data, None, url, key, jpeg_size=size), label, key
        try:
            image = Image.open(io.BytesIO(data))
            if encoded:  # other formats, and JPEGs whose header the scan could not read (Pillow names the problem)
                return EncodedImage(data, image, url, key), label, key
            image = image.convert("RGB") if image.mode != "RGB" else _loaded(image)
        except Exception as exn:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError ...)
            return BadData("corrupt_image", url, key, f"cannot decode image ({exn!r})")
        return image, label, key


def eval_assignment(num_shards: int, g: int, G: int) -> list[tuple[int, int, int]]:
    """Which shards (and which samples of them) global worker g of G reads in evaluation.

    Returns `(shard index, offset, stride)` triples: the worker reads samples `offset, offset + stride, ...` of
    each listed shard. With at least G shards, workers split the shards; with fewer, each shard is shared by the
    workers that map onto it, which take interleaved samples. Either way every sample is read exactly once.
    """
    if num_shards >= G:
        return [(index, 0, 1) for index in range(g, num_shards, G)]
    index = g % num_shards
    return [(index, g // num_shards, len(range(index, G, num_shards)))]


def train_quotas(batches_per_epoch: int, num_workers: int, batch_size: int, repeated_aug: int = 1) -> list[int]:
    """Raw samples each worker of a rank turns into batches in a training epoch without bad data.

    Worker `l` makes batches `l, l + W, ...`; each raw sample fills `repeated_aug` of their slots, the last one
    possibly fewer.

    Args:
        batches_per_epoch: training batches per rank and epoch.
        num_workers: readers per rank (`max(1, DataLoader workers)`).
        batch_size: samples per batch.
        repeated_aug: slots each raw sample fills.
    """
    slots = [len(range(worker, batches_per_epoch, num_workers)) * batch_size for worker in range(num_workers)]
    return [-(-filled // repeated_aug) for filled in slots]


def train_assignment(
    lengths: Sequence[int], order: Sequence[int], quotas: Sequence[int]
) -> list[list[tuple[int, int, int | None]]]:
    """Which samples each training reader reads in the first pass of a one-pass epoch.

    The shards, taken in `order`, make one sequence of `N` samples; reader `g` gets the run
    `[N * Q[g - 1] // T, N * Q[g] // T)` of it, where `Q[g]` is the sum of the first `g + 1` quotas and `T` their
    total. So every sample goes to exactly one reader, and each reader gets its quota within one sample when the
    quotas add up to `N`, no more than its quota when they exceed `N` (it tops up the rest), and no less when
    they fall short (it stops at its quota).

    Args:
        lengths: samples per shard.
        order: the epoch's shard order (shard indices).
        quotas: raw samples each reader turns into batches in the epoch.

    Returns:
        Per reader, `(shard index, start, stop)` pieces: samples `start, start + 1, ..., stop - 1` of the shard;
        `stop` is None where the piece runs to the shard's end (so its reader checks how the shard ends).
    """
    plan: list[list[tuple[int, int, int | None]]] = [[] for _ in quotas]
    total, total_quota = sum(lengths), sum(quotas)
    if not total_quota:
        return plan
    bounds, running = [], 0  # bounds[g]: end of reader g's run
    for quota in quotas:
        running += quota
        bounds.append(total * running // total_quota)
    reader, first = 0, 0  # first: position of the shard's first sample in the sequence
    for index in order:
        start, end = first, first + lengths[index]
        while start < end:
            while bounds[reader] <= start:
                reader += 1
            stop = min(end, bounds[reader])
            plan[reader].append((index, start - first, None if stop == end else stop - first))
            start = stop
        first = end
    return plan


class _Lookahead:
    """Raw samples -> usable decoded samples; a bad sample is recorded and replaced by the next usable one."""

    def __init__(self, raw: Iterator[dict], decode: Callable, bad: list[BadData]):
        self._raw = raw
        self._decode = decode
        self._bad = bad
        self._ahead: deque[list] = deque()  # [raw sample, decoded result or None]
        self._decoded = 0

    def take(self) -> tuple[Image.Image, int, str]:
        result = self._result(0)
        self._ahead.popleft()
        if not isinstance(result, BadData):
            return result
        self._bad.append(result)
        for position in range(_MAX_CONSECUTIVE_BAD):
            candidate = self._result(position)
            if not isinstance(candidate, BadData):
                return candidate
        raise RuntimeError(f"{_MAX_CONSECUTIVE_BAD} bad samples in a row after {result}; is this an image dataset?")

    def pop_decoded(self) -> int:
        decoded, self._decoded = self._decoded, 0
        return decoded

    def _result(self, position: int):
        while len(self._ahead) <= position:
            self._ahead.append([next(self._raw), None])
        entry = self._ahead[position]
        if entry[1] is None:
            entry[1] = self._decode(entry[0])
            self._decoded += 1
        return entry[1]


class _Repeated:
    """Each sample of a `_Lookahead` handed out `repeats` times in a row (repeated augmentation).

    Args:
        stream: the usable decoded samples.
        repeats: slots each sample fills.
        used: copies of the first sample that earlier batches took (resuming inside a group).
    """

    def __init__(self, stream: _Lookahead, repeats: int, used: int = 0):
        self._stream = stream
        self._repeats = repeats
        self._left = 0
        self._used = used
        self._current: tuple[Image.Image, int, str] | None = None
        self._taken = 0

    def take(self) -> tuple[Image.Image, int, str]:
        if not self._left:
            self._current = self._stream.take()
            self._left, self._used = self._repeats - self._used, 0
            self._taken += 1
        self._left -= 1
        return self._current

    def pop_taken(self) -> int:
        """Raw samples taken from the stream since the last call."""
        taken, self._taken = self._taken, 0
        return taken


def _reshuffled(shards: list[str], seed: int) -> Iterator[list[str]]:
    yield shards
    for round_ in count(1):
        shards = shards[:]
        random.Random(derive_seed(seed, round_)).shuffle(shards)
        yield shards


def _take_report(samples: int, bad: list[BadData], decoded: int | None = None) -> BatchReport:
    report = BatchReport(samples=samples, decoded=samples if decoded is None else decoded, bad=bad[:])
    bad.clear()
    return report


def _members(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def _loaded(image: Image.Image) -> Image.Image:
    image.load()
    return image


def _collate_eval(batch: list[tuple], transform: Callable) -> tuple:
    images, labels, keys = zip(*batch)
    collate = getattr(transform, "collate", default_collate)
    return collate(list(images)), torch.tensor(labels, dtype=torch.long), list(keys)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextmanager
def _preserve_global_rng(active: bool):
    """Per-sample seeding must not change the caller's RNG streams when the main process does the reading."""
    if not active:
        yield
        return
    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
