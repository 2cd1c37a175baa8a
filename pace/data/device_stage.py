"""The main-process half of the deferred decode paths: worker batches (`EncodedBatch`) to ready batches.

`DeviceStage` decodes a batch on the training device (`decode="device"`; nvJPEG on CUDA), crops, resizes, flips and
runs RandAugment grouped by op, or takes the workers' uint8 crops (`decode="draft"`), then normalises, erases and
mixes under per-batch seeds. A JPEG the decoder rejects is counted as `corrupt_image`; in training its place is
taken by a copy of another sample of the batch, in evaluation it is dropped.
"""

from __future__ import annotations

import itertools
import math
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from pace.data.augment_ops import apply_ops, apply_recorded
from pace.data.augment_params import TF_INTERPOLATION, SampleParams
from pace.data.shards import BadData

if TYPE_CHECKING:  # device_augment builds the stage (`make_stage`): a runtime import would be circular
    from pace.data.device_augment import _Deferred

# Marks an image that `EncodedBatch.pack` moved into the batch's packed tensor.
_PACKED = "packed"
# Separates the stage's per-batch seeds from the pipeline's (see pace.data.pipeline).
_STAGE_TAG = 7


@dataclass
class EncodedBatch:
    """What a worker hands the main process in the deferred modes.

    Args:
        images: per sample, the JPEG bytes (1-D uint8), a decoded image (uint8 CHW), or None when the worker
            could not decode it.
        params: per sample, its random choices.
        origins: per sample, `(shard url, key)`, to name a sample the device decoder rejects.
        bad: samples the worker could not decode (their `images` entry is None).
        ready: the images are already cropped and augmented (draft mode): only the batch tail remains.
    """

    images: list[torch.Tensor | str | None]
    params: list[SampleParams]
    origins: list[tuple[str, str]]
    bad: list[BadData] = field(default_factory=list)
    ready: bool = False
    packed: torch.Tensor | None = None
    lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def pack(self) -> EncodedBatch:
        """Move the per-sample tensors into one (the DataLoader gives each tensor it passes between processes a
        shared-memory segment of its own, which costs more than the copy); `unpack` restores them as views."""
        if self.ready:
            good = [image for image in self.images if image is not None]
            if good:
                blank = torch.zeros_like(good[0])
                # default_collate stacks straight into shared memory in a worker, so the batch crosses to the main
                # process without the copy the DataLoader otherwise makes of a tensor in ordinary memory.
                self.packed = default_collate([blank if image is None else image for image in self.images])
                self.images = [None if image is None else _PACKED for image in self.images]
            return self
        flat = [image for image in self.images if _is_bytes(image)]
        if flat:
            self.packed, self.lengths = torch.cat(flat), [len(image) for image in flat]
            self.images = [_PACKED if _is_bytes(image) else image for image in self.images]
        return self

    def unpack(self) -> list[torch.Tensor | None]:
        """The per-sample tensors (views of the packed one where packed)."""
        if self.packed is None:
            return list(self.images)
        views = iter(self.packed.unbind(0) if self.ready else self.packed.split(self.lengths))
        if self.ready:
            return [view if image is not None else None for image, view in zip(self.images, views)]
        return [next(views) if isinstance(image, str) else image for image in self.images]


def _is_bytes(image) -> bool:
    return isinstance(image, torch.Tensor) and image.dim() == 1


class DeviceStage:
    """Turns worker batches of `EncodedBatch`es into ready batches on the device, in the main process.

    Args:
        transform: the worker-side transform (`pace.data.device_augment`) whose batches it finishes; the stage
            takes its output size, normalisation mean and std, RandAugment fill, random-erasing fill and
            centre-crop fraction.
        device: the device.
        train: training (crop, flip, RandAugment, erase, mix) or evaluation (resize, centre crop).
        mixup: timm Mixup (or any `(images, targets) -> (images, targets)`), run under a per-batch seed.
        seed: the run's seed.
        rank: this process's rank.

    `prefetch` (on for CUDA) runs the decoding and augmentation ahead in a thread.
    """

    def __init__(
        self,
        transform: _Deferred,
        *,
        device: torch.device,
        train: bool,
        mixup: Callable | None,
        seed: int,
        rank: int,
    ):
        self.device = device
        self.train = train
        self.output_size = transform.output_size
        self.mean = torch.tensor(transform.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(transform.std, device=device).view(1, 3, 1, 1) * 255
        self.fill = transform.fill
        self.erase_mode = transform.erase_mode
        self.crop_pct = transform.crop_pct
        self.mixup = mixup
        self.seed = seed
        self.rank = rank
        self.prefetch = device.type == "cuda"
        # RandAugment per image (`apply_recorded`: Pillow's results, mostly computed on the tensor) on a CPU, where
        # that is several times cheaper than the batched tensor ops, which suit a GPU.
        self.per_image_ops = device.type == "cpu"
        self.buffers = BatchBuffers()

    def run(self, batches: Iterable[tuple], *, epoch: int, start_batch: int) -> Iterator[tuple]:
        """Finish each worker batch `(EncodedBatch, targets, [keys,] report)`; the report gains the decode
        failures. Batch `b` of the epoch runs under seeds derived from (seed, epoch, rank, b).

        With `prefetch` the decoding and augmentation run a batch or two ahead in a thread, so their launches
        overlap the training step's; Mixup (which draws from the global NumPy stream) stays in this thread."""
        items = self._augmented(batches, epoch, start_batch)
        if self.prefetch:
            items = _in_thread(items, depth=2)
        for images, targets, rest, seed in items:
            if seed is not None and self.mixup is not None:
                images, targets = _seeded(seed, self.mixup, images, targets)
            yield (images, targets, *rest)

    def _augmented(self, batches: Iterable[tuple], epoch: int, start_batch: int) -> Iterator[tuple]:
        from pace.data.pipeline import derive_seed  # the pipeline imports this module's users, not vice versa

        number = start_batch
        for encoded, targets, *rest in batches:
            report = rest[-1]
            if encoded is None:  # an evaluation worker's closing report
                yield encoded, targets, rest, None
            elif self.train:
                seed = derive_seed(self.seed, epoch, self.rank, _STAGE_TAG, number)
                number += 1
                yield (*self.augment_train(encoded, targets, report.bad, seed), rest, seed)
            else:
                images, targets, keys = self.finish_eval(encoded, targets, rest[0], report.bad)
                yield images, targets, [keys, report], None

    # -- training ------------------------------------------------------------------------------------------

    def finish_train(
        self, batch: EncodedBatch, targets: torch.Tensor, bad: list[BadData], seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode (unless ready), crop, flip, RandAugment, normalise, erase and mix one training batch."""
        images, targets = self.augment_train(batch, targets, bad, seed)
        if self.mixup is not None:
            images, targets = _seeded(seed, self.mixup, images, targets)
        return images, targets

    def augment_train(
        self, batch: EncodedBatch, targets: torch.Tensor, bad: list[BadData], seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All of `finish_train` but the mixing (thread-safe: its randomness comes from `seed` alone)."""
        pictures = self._decode(batch, bad)
        order = _refill(pictures, batch)
        targets = targets[order].to(self.device, non_blocking=True)
        params = [batch.params[k] for k in order]
        if batch.ready:
            refilled = order != list(range(len(order)))  # indexing copies the batch: only where a sample failed
            images = batch.packed[torch.tensor(order)] if refilled else batch.packed
            images = images.to(self.device, non_blocking=True)
        else:
            images = self._crop_flip_augment([pictures[k] for k in order], params)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        images = self._normalise(images)
        return self._erase(images, params, generator), targets

    def _crop_flip_augment(
        self, pictures: list[torch.Tensor], params: list[SampleParams]
    ) -> torch.Tensor | list[torch.Tensor]:
        """uint8 crops: a batch tensor, or on a CPU a list (`_normalise` writes each into the batch)."""
        if self.per_image_ops:
            crops = [resize_crop(picture, p, self.output_size) for picture, p in zip(pictures, params)]
            crops = [crop.flip(-1) if p.flip else crop for crop, p in zip(crops, params)]
            return [apply_recorded(crop, p.ops, self.fill) for crop, p in zip(crops, params)]
        images = resize_crops(pictures, params, self.output_size, uint8_kernel=self.device.type == "cpu")
        flips = torch.tensor([p.flip for p in params], device=images.device)
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        layers = max((len(p.ops) for p in params), default=0)
        for layer in range(layers):
            images = apply_ops(images, [p.ops[layer] if layer < len(p.ops) else None for p in params], self.fill)
        return images

    def _normalise(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, S, S) float from uint8 images (a batch, or on a CPU also a list of (3, S, S))."""
        if self.device.type != "cpu":
            return (torch.stack(images) if isinstance(images, list) else images).float().sub_(self.mean).div_(self.std)
        # Into memory whose pages are already in place, one image at a time: its float copy is still in the cache
        # for the two passes after it (in place: a third of the memory traffic).
        out = self.buffers.take(torch.Size([len(images), *images[0].shape]))
        mean, std = self.mean[0], self.std[0]
        for slot, image in zip(out, images):
            slot.copy_(image).sub_(mean).div_(std)
        return out

    def _erase(self, images: torch.Tensor, params: list[SampleParams], generator: torch.Generator) -> torch.Tensor:
        for index, p in enumerate(params):
            for top, left, h, w in p.erase:
                if self.erase_mode == "pixel":
                    fill = torch.randn((3, h, w), generator=generator, device=images.device)
                elif self.erase_mode == "rand":
                    fill = torch.randn((3, 1, 1), generator=generator, device=images.device)
                else:
                    fill = torch.zeros((3, 1, 1), device=images.device)
                images[index, :, top : top + h, left : left + w] = fill
        return images

    # -- evaluation ----------------------------------------------------------------------------------------

    def finish_eval(
        self, batch: EncodedBatch, targets: torch.Tensor, keys: list[str], bad: list[BadData]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str] | None]:
        """Decode, resize the shorter side, centre crop and normalise; undecodable samples are dropped."""
        pictures = self._decode(batch, bad)
        kept = [k for k, picture in enumerate(pictures) if picture is not None]
        if not kept:
            return None, None, None
        resize = math.floor(self.output_size / self.crop_pct)
        side = [self.output_size, self.output_size]
        images = []
        for k in kept:
            mode = TF_INTERPOLATION.get(batch.params[k].interpolation, TF.InterpolationMode.BICUBIC)
            resized = TF.resize(pictures[k], [resize], interpolation=mode, antialias=True)
            images.append(TF.center_crop(resized, side))
        images = self._normalise(images)
        return images, targets[kept].to(self.device), [keys[k] for k in kept]

    # -- decoding ------------------------------------------------------------------------------------------

    def _decode(self, batch: EncodedBatch, bad: list[BadData]) -> list[torch.Tensor | None]:
        """Every image of the batch as uint8 CHW on the device (or, ready, as it came); None where it fails."""
        bad.extend(batch.bad)
        pictures = batch.unpack()
        if batch.ready:
            return pictures
        jpegs = [k for k, picture in enumerate(pictures) if picture is not None and picture.dim() == 1]
        for k, picture in enumerate(pictures):
            if picture is not None and picture.dim() == 3:
                pictures[k] = picture.to(self.device, non_blocking=True)
        for k, decoded in zip(jpegs, self._decode_jpegs([pictures[k] for k in jpegs])):
            if isinstance(decoded, Exception):
                url, key = batch.origins[k]
                bad.append(BadData("corrupt_image", url, key, f"the JPEG decoder rejects it ({decoded})"))
                decoded = None
            pictures[k] = decoded
        return pictures

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        if not data:
            return []
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad JPEG fails the batch call: find it image by image
            results: list[torch.Tensor | Exception] = []
            for item in data:
                try:
                    results.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as exn:
                    results.append(RuntimeError(str(exn).splitlines()[-1][:200]))
            return results


def resize_crops(
    pictures: list[torch.Tensor], params: list[SampleParams], side: int, *, uint8_kernel: bool
) -> torch.Tensor:
    """Crop each picture to its box and resize it to side x side (antialiased), as one uint8 batch.

    Args:
        pictures: uint8 (3, H, W) images.
        params: their crop boxes and interpolations.
        side: output side.
        uint8_kernel: resample with torch's uint8 kernels (fast on CPUs) one crop at a time; otherwise resample
            in float and round the whole batch at once (fewer kernel launches on a GPU).

    Returns:
        (B, 3, side, side) uint8.
    """
    crops = []
    for picture, p in zip(pictures, params):
        if uint8_kernel:
            crops.append(resize_crop(picture, p, side))
        else:
            top, left, height, width = p.crop
            view = picture[:, top : top + height, left : left + width]
            smooth = p.interpolation != "nearest"
            crops.append(
                F.interpolate(view[None].float(), size=(side, side), mode=p.interpolation, antialias=smooth)[0]
            )
    images = torch.stack(crops)  # (B, 3, side, side)
    return images if uint8_kernel else images.round_().clamp_(0, 255).to(torch.uint8)


class BatchBuffers:
    """Float batches on a CPU in memory that earlier batches used, once nothing refers to it any more.

    A fresh 38 MB batch (64 x 3 x 224 x 224 float) is above glibc's largest mmap threshold, so each one is mapped
    anew and its pages are faulted in one by one: about 0.25 ms of CPU per sample on the machines we measured, more
    than normalising it. A buffer is handed out again only when the batch tensor and every view of it are gone:
    a tensor made by `torch.frombuffer` keeps a reference to its bytearray, so the bytearray's reference count says
    whether any tensor still uses it (a consumer that keeps its batches makes the pool allocate new ones).

    Args:
        keep: buffers held for reuse.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._pool: list[bytearray] = [bytearray(1)]
        self._free = sys.getrefcount(self._pool[0])  # an unused buffer's count, measured as `take` measures it
        self._pool = []

    def take(self, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised tensor of `shape`; its memory is reused when no tensor refers to it."""
        size = math.prod(shape) * dtype.itemsize
        for index in range(len(self._pool)):
            # A tensor from torch.frombuffer (and every view, through its storage) holds a reference to the
            # bytearray: more references than an unused one in the same place (`_free`) means it is in use.
            if len(self._pool[index]) == size and sys.getrefcount(self._pool[index]) <= self._free:
                return torch.frombuffer(self._pool[index], dtype=dtype).view(shape)
        buffer = bytearray(size)
        self._pool = [buffer, *self._pool][: self.keep]  # the oldest leaves the pool (its holder keeps it alive)
        return torch.frombuffer(buffer, dtype=dtype).view(shape)


def resize_crop(picture: torch.Tensor, params: SampleParams, side: int) -> torch.Tensor:
    """One picture's crop box resized to side x side with torch's uint8 kernel (antialiased): (3, side, side)."""
    top, left, height, width = params.crop
    view = picture[:, top : top + height, left : left + width]
    return TF.resize(view, [side, side], interpolation=TF_INTERPOLATION[params.interpolation], antialias=True)


def _in_thread(items: Iterator, depth: int) -> Iterator:
    """Iterate `items` in a daemon thread, up to `depth` ahead; its exceptions are raised here, and the thread
    stops when this generator is closed."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def fill() -> None:
        try:
            for item in itertools.chain(items, [end]):
                while not stop.is_set():
                    try:
                        ready.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exn:  # handed to the consumer, which raises it
            ready.put((exn, None))

    threading.Thread(target=fill, daemon=True, name="pace-device-stage").start()
    try:
        while True:
            error, item = ready.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def _refill(pictures: list, batch: EncodedBatch) -> list[int]:
    """Indices that fill the batch: each sample that failed is replaced by the next one that did not."""
    good = [k for k, picture in enumerate(pictures) if picture is not None]
    if not good:
        raise RuntimeError(f"no image of a batch of {len(pictures)} could be decoded: {batch.bad[:3]}")
    return [k if pictures[k] is not None else next((g for g in good if g > k), good[0]) for k in range(len(pictures))]


def _seeded(seed: int, function: Callable, *args):
    """Run `function` with the Python, NumPy and torch RNGs seeded by `seed` (timm's Mixup draws from NumPy),
    leaving the caller's streams as they were."""
    from pace.data.pipeline import _preserve_global_rng, _seed_everything  # the pipeline imports this module

    with _preserve_global_rng(True):
        _seed_everything(seed)
        return function(*args)
