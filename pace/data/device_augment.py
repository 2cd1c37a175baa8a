"""Decode and augment in batches on the training device, with every random choice made in the CPU workers.

The shard pipeline hands these transforms an `EncodedImage` (the JPEG bytes and the header, nothing decoded).
A worker-side transform draws all of one sample's random choices in the order timm's train transform draws them
(RandomResizedCrop box and interpolation, flip, RandAugment ops and magnitudes, random-erasing boxes), under the
per-sample seed the pipeline sets, so the choices are a function of (seed, epoch, sample place) and a resumed
epoch repeats them. The main process then runs a `DeviceStage` on each batch:

* `decode="device"` (`create_device_train_transform`): the workers only read bytes and draw choices; the stage
  decodes the batch with `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, libjpeg-turbo on the
  CPU), crops and resizes each image, flips, and runs RandAugment grouped by op over the batch;
* `decode="draft"` (`create_draft_train_transform`): the workers decode at the largest JPEG DCT scale the drawn
  crop allows (`Image.draft`), crop and resize in one step, and run timm's own flip and RandAugment; the stage
  gets uint8 crops.

Both end in the stage with normalisation, random erasing (noise from a per-batch generator), and timm's Mixup /
CutMix under a per-batch seed. A JPEG the decoder rejects is counted as `corrupt_image`; in training its place in
the batch is taken by a copy of another sample of the batch (the batch keeps its size, so Mixup still pairs and
compiled models see one shape), in evaluation it is dropped.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomHorizontalFlip

from pace.data.shards import BadData
from pace.data.transforms import create_train_transform

# Marks an image that `EncodedBatch.pack` moved into the batch's packed tensor.
_PACKED = "packed"
# Separates the stage's per-batch seeds from the pipeline's (see pace.data.pipeline).
_STAGE_TAG = 7
_INTERPOLATION = {
    Image.Resampling.NEAREST: "nearest",
    Image.Resampling.BILINEAR: "bilinear",
    Image.Resampling.BICUBIC: "bicubic",
}
_PIL_FILTERS = {name: code for code, name in _INTERPOLATION.items()}
_TF_INTERPOLATION = {"nearest": TF.InterpolationMode.NEAREST, "bilinear": TF.InterpolationMode.BILINEAR}
_TF_INTERPOLATION["bicubic"] = TF.InterpolationMode.BICUBIC
_GEOMETRIC = {
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x_rel",
    "translate_y_rel",
    "translate_x_abs",
    "translate_y_abs",
}
_SUPPORTED_OPS = _GEOMETRIC | {
    "auto_contrast",
    "equalize",
    "invert",
    "posterize",
    "_posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
}


@dataclass
class EncodedImage:
    """A sample's image as the shard holds it: the bytes and the parsed header (nothing decoded yet).

    Args:
        data: the file's bytes.
        header: the image opened lazily by Pillow (size and format read, pixels not).
        url: the shard it came from.
        key: the sample's key.
    """

    data: bytes
    header: Image.Image
    url: str = ""
    key: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.header.size


@dataclass
class SampleParams:
    """One sample's random choices, drawn in a worker, applied on the device.

    Args:
        crop: RandomResizedCrop box `(top, left, height, width)` in full-size pixels (None: evaluation).
        interpolation: resize interpolation of the crop.
        flip: horizontal flip.
        ops: RandAugment ops in order, `(op name, arguments, interpolation or None)`.
        erase: random-erasing boxes `(top, left, height, width)` in output pixels.
    """

    crop: tuple[int, int, int, int] | None = None
    interpolation: str = "bicubic"
    flip: bool = False
    ops: list[tuple[str, tuple, str | None]] = field(default_factory=list)
    erase: list[tuple[int, int, int, int]] = field(default_factory=list)


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
                self.packed = torch.stack([blank if image is None else image for image in self.images])
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


class ParamSampler:
    """Draws a sample's augmentation choices with timm's own samplers, in the order timm's transform draws them.

    Args:
        transform: a timm train transform from `create_train_transform` (RandomResizedCrop, flip, RandAugment,
            normalise, random erasing); colour jitter and other policies are not supported here.
    """

    def __init__(self, transform: Callable):
        steps = list(getattr(transform, "transforms", []))
        self.crop = _take(steps, RandomResizedCropAndInterpolation)
        if self.crop is None:
            raise ValueError("the device path needs a train transform that starts with RandomResizedCrop")
        self.flip = _take(steps, RandomHorizontalFlip)
        self.randaug_pil = _take(steps, RandAugment)  # timm's own, for the draft path's PIL images
        self.randaug = _recording(self.randaug_pil)
        self.erasing = _take(steps, RandomErasing)
        unsupported = [
            type(step).__name__ for step in steps if type(step).__name__ not in ("MaybeToTensor", "Normalize")
        ]
        if unsupported:
            raise ValueError(f"the device path does not support these train-transform steps: {unsupported}")
        self.output_size = self.crop.size[0]

    def sample(self, header: Image.Image) -> SampleParams:
        """All of one sample's choices.

        Args:
            header: the lazily opened full-size image (timm's crop sampler reads its size only).
        """
        params = SampleParams(crop=self.crop.get_params(header, self.crop.scale, self.crop.ratio))
        params.interpolation = self.sample_interpolation()
        params.flip = self.sample_flip()
        params.ops = self.sample_ops()
        params.erase = self.sample_erase()
        return params

    def sample_interpolation(self) -> str:
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (list, tuple)):
            interpolation = random.choice(interpolation)
        return _INTERPOLATION.get(interpolation, "bicubic")

    def sample_flip(self) -> bool:
        return self.flip is not None and bool(torch.rand(1) < self.flip.p)

    def sample_ops(self) -> list[tuple[str, tuple, str | None]]:
        if self.randaug is None:
            return []
        record: list = []
        self.randaug(record)
        return record

    def sample_erase(self) -> list[tuple[int, int, int, int]]:
        """Random-erasing boxes, drawn as timm's `RandomErasing._erase` draws them for one output image."""
        erasing, side = self.erasing, self.output_size
        if erasing is None or random.random() > erasing.probability:
            return []
        count = erasing.min_count
        if erasing.min_count != erasing.max_count:
            count = random.randint(erasing.min_count, erasing.max_count)
        boxes = []
        for _ in range(count):
            for _attempt in range(10):
                target_area = random.uniform(erasing.min_area, erasing.max_area) * side * side / count
                aspect_ratio = math.exp(random.uniform(*erasing.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < side and h < side:
                    boxes.append((random.randint(0, side - h), random.randint(0, side - w), h, w))
                    break
        return boxes


def _take(steps: list, kind: type):
    found = next((step for step in steps if isinstance(step, kind)), None)
    if found is not None:
        steps.remove(found)
    return found


def _recording(randaug: RandAugment | None) -> RandAugment | None:
    """A copy of timm's RandAugment whose ops record `(name, args, interpolation)` instead of changing a picture.

    timm's op objects still draw the op choice, the application probability, the magnitude noise and the sign,
    so the distribution is timm's by construction."""
    if randaug is None:
        return None
    recording = copy.copy(randaug)
    recording.ops = []
    for op in randaug.ops:
        name = op.aug_fn.__name__
        if name not in _SUPPORTED_OPS:
            raise ValueError(f"RandAugment op {op.name} ({name}) has no device implementation")
        clone = copy.copy(op)
        clone.aug_fn = _recorder(name.lstrip("_"))
        recording.ops.append(clone)
    return recording


def _recorder(name: str) -> Callable:
    def record(sink: list, *args, **kwargs) -> list:
        interpolation = None
        if name in _GEOMETRIC:  # timm picks the resample filter inside the op, after the magnitude
            resample = kwargs.get("resample", Image.Resampling.BILINEAR)
            if isinstance(resample, (list, tuple)):
                resample = random.choice(resample)
            interpolation = _INTERPOLATION.get(resample, "bilinear")
        sink.append((name, tuple(args), interpolation))
        return sink

    return record


# -- worker-side transforms ------------------------------------------------------------------------------------


class _Deferred:
    """Shared by the worker-side transforms: the pipeline passes them `EncodedImage`s and collates with them."""

    takes_encoded = True
    erase_mode = "const"
    crop_pct = 1.0

    def __init__(self, *, output_size: int, mean, std, device: torch.device | str, fill: tuple[int, ...]):
        self.output_size = output_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.fill = fill

    def collate(self, items: list) -> EncodedBatch:
        """The pipeline's collate: per-sample results -> one `EncodedBatch`."""
        images, params, origins, bad = [], [], [], []
        for image, sample_params, origin in items:
            if isinstance(image, BadData):
                bad.append(image)
                image = None
            images.append(image)
            params.append(sample_params)
            origins.append(origin)
        return EncodedBatch(images, params, origins, bad, ready=isinstance(self, DraftTrainTransform)).pack()

    def make_stage(
        self, *, train: bool, seed: int, rank: int, mixup: Callable | None = None, device: torch.device | None = None
    ) -> DeviceStage:
        """The main-process half (see `DeviceStage`); `device` overrides the transform's."""
        return DeviceStage(
            device=device or self.device,
            train=train,
            output_size=self.output_size,
            mean=self.mean,
            std=self.std,
            fill=self.fill,
            erase_mode=self.erase_mode,
            crop_pct=self.crop_pct,
            mixup=mixup,
            seed=seed,
            rank=rank,
        )


def _payload(image: EncodedImage) -> torch.Tensor:
    """JPEG bytes as a 1-D uint8 tensor for the device decoder; other formats decoded here, uint8 CHW."""
    if image.header.format == "JPEG":
        return torch.frombuffer(bytearray(image.data), dtype=torch.uint8)
    return _to_chw(image.header.convert("RGB"))


def _to_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


class DeviceTrainTransform(_Deferred):
    """Worker half of `decode="device"` training: bytes through, every random choice drawn here."""

    def __init__(self, sampler: ParamSampler, *, erase_mode: str, **common):
        super().__init__(output_size=sampler.output_size, **common)
        self.sampler = sampler
        self.erase_mode = erase_mode

    def __call__(self, image: EncodedImage) -> tuple[torch.Tensor, SampleParams, tuple[str, str]]:
        return _payload(image), self.sampler.sample(image.header), (image.url, image.key)


class DraftTrainTransform(_Deferred):
    """Worker half of `decode="draft"` training: decode at a reduced JPEG scale where the crop allows, crop and
    resize, then timm's own flip and RandAugment on the PIL image; normalising, erasing and mixing run in the stage.

    The DCT scale is the largest of 1/8, 1/4, 1/2 that keeps both sides of the drawn crop at or above the output
    side, so no pixel the full-size crop would have resampled from is lost to upsampling; there Pillow decodes
    (`Image.draft`) and resamples the scaled crop box. At full scale torchvision's decoder and torch's uint8
    resampler do the same work in about half Pillow's time.
    """

    def __init__(self, sampler: ParamSampler, *, erase_mode: str, **common):
        super().__init__(output_size=sampler.output_size, **common)
        self.sampler = sampler
        self.erase_mode = erase_mode

    def __call__(self, image: EncodedImage) -> tuple[torch.Tensor | BadData, SampleParams, tuple[str, str]]:
        sampler = self.sampler
        top, left, height, width = sampler.crop.get_params(image.header, sampler.crop.scale, sampler.crop.ratio)
        params = SampleParams(crop=(top, left, height, width), interpolation=sampler.sample_interpolation())
        side, headroom = self.output_size, min(height, width) / self.output_size
        try:
            if headroom < 2 and image.header.format == "JPEG":
                # Full size: libjpeg-turbo through torchvision and torch's uint8 resampler, about twice as fast
                # as Pillow's decoder and resize here (same filter, antialiased; a level of rounding apart).
                full = decode_jpeg(_payload(image), mode=ImageReadMode.RGB)  # (3, H, W) uint8
                crop = full[:, top : top + height, left : left + width]
                mode = _TF_INTERPOLATION[params.interpolation]
                resized = TF.resize(crop, [side, side], interpolation=mode, antialias=True)
                picture = Image.fromarray(resized.permute(1, 2, 0).numpy())
            else:
                picture = decode_scaled(image, headroom)
                sx, sy = picture.size[0] / image.size[0], picture.size[1] / image.size[1]
                box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
                picture = picture.resize((side, side), _PIL_FILTERS[params.interpolation], box=box)
        except Exception as exn:  # the decoders raise many types for damaged data
            params.erase = sampler.sample_erase()
            bad = BadData("corrupt_image", image.url, image.key, f"cannot decode image ({exn!r})")
            return bad, params, (image.url, image.key)
        if sampler.flip is not None:
            picture = sampler.flip(picture)  # timm's own steps: the same random draws, in the same order
        if sampler.randaug is not None:
            picture = sampler.randaug_pil(picture)
        params.erase = sampler.sample_erase()
        return _to_chw(picture), params, (image.url, image.key)


def decode_scaled(image: EncodedImage, headroom: float) -> Image.Image:
    """Decode at the largest JPEG DCT scale (1/8, 1/4, 1/2) that keeps `headroom` (crop side / output side) >= 1.

    Args:
        image: the encoded image.
        headroom: the crop's shorter side over the output side.

    Returns:
        The decoded RGB image (smaller than the original when a scale applied).
    """
    picture = Image.open(io.BytesIO(image.data))
    scale = next((s for s in (8, 4, 2) if headroom >= s), 1)
    if scale > 1 and picture.format == "JPEG":
        width, height = picture.size
        picture.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
    return picture.convert("RGB")


class DeviceEvalTransform(_Deferred):
    """Worker half of device evaluation: bytes through (resize and centre crop happen in the stage).

    Args:
        crop_pct: centre-crop fraction (the shorter side is resized to `floor(output_size / crop_pct)`).
    """

    def __init__(self, *, crop_pct: float, interpolation: str, **common):
        super().__init__(**common)
        self.crop_pct = crop_pct
        self.interpolation = interpolation

    def __call__(self, image: EncodedImage) -> tuple[torch.Tensor, SampleParams, tuple[str, str]]:
        return _payload(image), SampleParams(interpolation=self.interpolation), (image.url, image.key)


# -- builders --------------------------------------------------------------------------------------------------


def create_device_train_transform(
    *,
    input_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    device: torch.device | str = "cpu",
    draft: bool = False,
) -> DeviceTrainTransform | DraftTrainTransform:
    """timm's train transform split into worker-side choices and a device-side batch stage.

    The arguments mean what they mean for `create_train_transform` (colour jitter is not offered: timm drops it
    under RandAugment, the recipe's setting). Pass the result to `create_train_loader(transform=...)`; the loader
    then yields normalised, erased (and, with a batch transform, mixed) batches on `device`.

    Args:
        input_size: output side in pixels.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: horizontal flip probability.
        auto_augment: timm RandAugment spec (`rand-...`); None: off.
        interpolation: resize interpolation (`bicubic`, `bilinear`, `random`).
        re_prob: random-erasing probability.
        re_mode: random-erasing fill (`pixel`, `rand`, `const`).
        re_count: random-erasing regions.
        mean: normalisation mean.
        std: normalisation std.
        device: where the stage decodes (`decode="device"`) and finishes the batches.
        draft: decode in the workers at a reduced JPEG scale where the crop allows (`decode="draft"`).
    """
    if auto_augment and not auto_augment.startswith("rand"):
        raise ValueError(f"aug.auto_augment={auto_augment!r}: the device path supports RandAugment (rand-...) only")
    timm_transform = create_train_transform(
        input_size=input_size,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        color_jitter=None,
        auto_augment=auto_augment,
        interpolation=interpolation,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        mean=mean,
        std=std,
    )
    sampler = ParamSampler(timm_transform)
    kind = DraftTrainTransform if draft else DeviceTrainTransform
    return kind(sampler, erase_mode=re_mode, mean=mean, std=std, device=device, fill=_fill(mean))


def create_device_eval_transform(
    *,
    input_size: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    device: torch.device | str = "cpu",
) -> DeviceEvalTransform:
    """timm's eval transform (resize the shorter side to input_size / crop_pct, centre crop) on the device.

    Args:
        input_size: output side in pixels.
        crop_pct: centre-crop fraction.
        interpolation: resize interpolation.
        mean: normalisation mean.
        std: normalisation std.
        device: where the stage decodes and resizes.
    """
    return DeviceEvalTransform(
        output_size=input_size,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=mean,
        std=std,
        device=device,
        fill=_fill(mean),
    )


def _fill(mean: Iterable[float]) -> tuple[int, ...]:
    return tuple(min(255, round(255 * m)) for m in mean)  # timm's RandAugment fill colour


# -- the main-process stage ------------------------------------------------------------------------------------


class DeviceStage:
    """Turns worker batches of `EncodedBatch`es into ready batches on the device, in the main process.

    Args:
        device: the device.
        train: training (crop, flip, RandAugment, erase, mix) or evaluation (resize, centre crop).
        output_size: output side.
        mean: normalisation mean.
        std: normalisation std.
        fill: RandAugment fill colour (uint8 RGB).
        erase_mode: random-erasing fill (`pixel`, `rand`, `const`).
        crop_pct: evaluation centre-crop fraction.
        mixup: timm Mixup (or any `(images, targets) -> (images, targets)`), run under a per-batch seed.
        seed: the run's seed.
        rank: this process's rank.

    `prefetch` (on for CUDA) runs the decoding and augmentation ahead in a thread.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        train: bool,
        output_size: int,
        mean,
        std,
        fill: tuple[int, ...],
        erase_mode: str,
        crop_pct: float,
        mixup: Callable | None,
        seed: int,
        rank: int,
    ):
        self.device = device
        self.train = train
        self.output_size = output_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.fill = fill
        self.erase_mode = erase_mode
        self.crop_pct = crop_pct
        self.mixup = mixup
        self.seed = seed
        self.rank = rank
        self.prefetch = device.type == "cuda"

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
            images = batch.packed[torch.tensor(order)].to(self.device, non_blocking=True)
        else:
            images = self._crop_flip_augment([pictures[k] for k in order], params)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        images = self._normalise(images)
        return self._erase(images, params, generator), targets

    def _crop_flip_augment(self, pictures: list[torch.Tensor], params: list[SampleParams]) -> torch.Tensor:
        images = resize_crops(pictures, params, self.output_size, uint8_kernel=self.device.type == "cpu")
        flips = torch.tensor([p.flip for p in params], device=images.device)
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        layers = max((len(p.ops) for p in params), default=0)
        for layer in range(layers):
            images = apply_ops(images, [p.ops[layer] if layer < len(p.ops) else None for p in params], self.fill)
        return images

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().sub_(self.mean).div_(self.std)  # in place: a third of the memory traffic on a CPU

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
            mode = _TF_INTERPOLATION.get(batch.params[k].interpolation, TF.InterpolationMode.BICUBIC)
            resized = TF.resize(pictures[k], [resize], interpolation=mode, antialias=True)
            images.append(TF.center_crop(resized, side))
        images = self._normalise(torch.stack(images))
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
        top, left, height, width = p.crop
        view = picture[:, top : top + height, left : left + width]
        if uint8_kernel:
            crops.append(
                TF.resize(view, [side, side], interpolation=_TF_INTERPOLATION[p.interpolation], antialias=True)
            )
        else:
            smooth = p.interpolation != "nearest"
            crops.append(
                F.interpolate(view[None].float(), size=(side, side), mode=p.interpolation, antialias=smooth)[0]
            )
    images = torch.stack(crops)  # (B, 3, side, side)
    return images if uint8_kernel else images.round_().clamp_(0, 255).to(torch.uint8)


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


# -- RandAugment on uint8 batches ------------------------------------------------------------------------------


def apply_ops(images: torch.Tensor, ops: list[tuple[str, tuple, str | None] | None], fill: tuple[int, ...]):
    """Apply one RandAugment layer: sample `k` gets `ops[k]` (None: unchanged), grouped by op over the batch.

    Args:
        images: (B, 3, H, W) uint8.
        ops: per sample, `(name, args, interpolation)` as `ParamSampler.sample_ops` records them.
        fill: fill colour of the geometric ops.

    Returns:
        (B, 3, H, W) uint8.
    """
    out = images.clone()
    groups: dict[tuple, list[int]] = {}
    for index, op in enumerate(ops):
        if op is not None:
            name, _, interpolation = op
            groups.setdefault((name, interpolation if name in _GEOMETRIC else None), []).append(index)
    for (name, interpolation), members in groups.items():
        index = torch.tensor(members, device=images.device)
        args = [ops[k][1] for k in members]
        out[index] = _apply_group(name, images[index], args, interpolation, fill)
    return out


def _apply_group(name: str, x: torch.Tensor, args: list[tuple], interpolation: str | None, fill) -> torch.Tensor:
    """One op on a group of images (N, 3, H, W) uint8, each with its own arguments."""
    if name == "auto_contrast":
        return TF.autocontrast(x)
    if name == "equalize":
        return TF.equalize(x)
    if name == "invert":
        return TF.invert(x)
    if name in _GEOMETRIC:
        return _affine(x, [_inverse_matrix(name, a, x.shape[-1], x.shape[-2]) for a in args], interpolation, fill)
    value = torch.tensor([a[0] for a in args], dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
    if name == "posterize":
        bits = value.clamp(0, 8).to(torch.int32)
        mask = (0xFF << (8 - bits)) & 0xFF  # keep the top `bits` bits (0 bits: black, as timm's posterize)
        return (x.to(torch.int32) & mask).to(torch.uint8)
    if name == "solarize":
        return torch.where(x.float() >= value, 255 - x, x)
    if name == "solarize_add":
        threshold = args[0][1] if len(args[0]) > 1 else 128
        return torch.where(x < threshold, (x.float() + value).clamp(max=255).to(torch.uint8), x)
    return _enhance(name, x, value)


def _enhance(name: str, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageEnhance ops: blend the image with a degenerate version by a per-sample factor."""
    image = x.float()
    if name == "brightness":
        degenerate = torch.zeros_like(image)
    elif name == "color":
        degenerate = _gray(image).expand_as(image)
    elif name == "contrast":
        degenerate = (_gray(image).mean(dim=(-3, -2, -1), keepdim=True) + 0.5).floor().expand_as(image)
    elif name == "sharpness":
        kernel = torch.ones(3, 3, device=x.device)
        kernel[1, 1] = 5.0
        kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3)
        smooth = F.conv2d(image, kernel, groups=3).round()
        degenerate = image.clone()
        degenerate[..., 1:-1, 1:-1] = smooth  # Pillow keeps the border pixels
    else:
        raise ValueError(f"unknown RandAugment op {name}")
    return (degenerate + factor * (image - degenerate)).round().clamp(0, 255).to(torch.uint8)


def _gray(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).floor().unsqueeze(-3)  # Pillow's "L" conversion (truncated)


def _inverse_matrix(name: str, args: tuple, width: int, height: int) -> list[float]:
    """Pillow's affine data (output pixel -> input pixel) of timm's geometric ops."""
    value = args[0]
    if name == "shear_x":
        return [1, value, 0, 0, 1, 0]
    if name == "shear_y":
        return [1, 0, 0, value, 1, 0]
    if name == "translate_x_rel":
        return [1, 0, value * width, 0, 1, 0]
    if name == "translate_y_rel":
        return [1, 0, 0, 0, 1, value * height]
    if name == "translate_x_abs":
        return [1, 0, value, 0, 1, 0]
    if name == "translate_y_abs":
        return [1, 0, 0, 0, 1, value]
    angle = -math.radians(value)  # rotate: counter-clockwise about the centre, as Image.rotate
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = width / 2, height / 2
    return [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]


def _affine(x: torch.Tensor, matrices: list[list[float]], interpolation: str | None, fill) -> torch.Tensor:
    """Resample each image through its Pillow-style affine map (pixel centres at +0.5), filling outside."""
    n, _, h, w = x.shape
    m = torch.tensor(matrices, dtype=torch.float32, device=x.device).view(n, 2, 3)
    # normalised output -> pixel output -> pixel input -> normalised input (align_corners=False convention)
    to_pixel = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], device=x.device)
    to_norm = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1]], device=x.device)
    full = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]], device=x.device).expand(n, 1, 3)], dim=1)
    theta = to_norm @ full @ to_pixel  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, 4, h, w], align_corners=False)
    inside = torch.ones(n, 1, h, w, device=x.device)
    sampled = F.grid_sample(
        torch.cat([x.float(), inside], dim=1), grid, mode=interpolation or "bilinear", align_corners=False
    )
    colour = torch.tensor(fill, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    mask = (sampled[:, 3:] > 0.5).float()  # Pillow fills a pixel whose source lies outside
    return (sampled[:, :3] * mask + colour * (1 - mask)).round().clamp(0, 255).to(torch.uint8)
