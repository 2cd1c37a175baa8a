"""Decode and augment in batches on the training device, with every random choice made in the CPU workers.

The shard pipeline hands these transforms an `EncodedImage` (the JPEG bytes and the header, nothing decoded).
A worker-side transform draws all of one sample's random choices in the order timm's train transform draws them
(RandomResizedCrop box and interpolation, flip, RandAugment ops and magnitudes, random-erasing boxes), under the
per-sample seed the pipeline sets, so the choices are a function of (seed, epoch, sample place) and a resumed
epoch repeats them. The main process then runs a `DeviceStage` on each batch:

* `decode="device"` (`create_device_train_transform`): the workers only read bytes and draw choices; the stage
  decodes the batch with `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, libjpeg-turbo on the
  CPU), crops and resizes each image, flips, and runs RandAugment (on CUDA grouped by op over the batch,
  `pace.data.augment_ops.apply_ops`; on a CPU per image, `apply_recorded`, several times cheaper there);
* `decode="draft"` (`create_device_train_transform(draft=True)`): the workers decode at the largest JPEG DCT scale
  the drawn crop allows (`Image.draft`), crop and resize, flip, and run RandAugment per image (`apply_recorded`:
  Pillow's arithmetic on the tensor, shears and translations as 1-D filters, rotation in Pillow); the stage gets
  uint8 crops.

Modules: `augment_params` (the draws), `augment_ops` (RandAugment on tensors), `device_stage` (the main-process
half); this one holds the worker halves and the builders.

Both end in the stage with normalisation, random erasing (noise from a per-batch generator), and timm's Mixup /
CutMix under a per-batch seed. A JPEG the decoder rejects is counted as `corrupt_image`; in training its place in
the batch is taken by a copy of another sample of the batch (the batch keeps its size, so Mixup still pairs and
compiled models see one shape), in evaluation it is dropped.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_jpeg

from pace.data.augment_ops import apply_ops, apply_recorded, pil_to_chw
from pace.data.augment_params import (
    PIL_FILTERS,
    EncodedImage,
    ParamSampler,
    SampleParams,
)
from pace.data.device_stage import DeviceStage, EncodedBatch, resize_crop, resize_crops
from pace.data.shards import BadData
from pace.data.transforms import create_train_transform

__all__ = [
    "DeviceEvalTransform",
    "DeviceStage",
    "DeviceTrainTransform",
    "DraftTrainTransform",
    "EncodedBatch",
    "EncodedImage",
    "ParamSampler",
    "SampleParams",
    "apply_ops",
    "create_device_eval_transform",
    "create_device_train_transform",
    "decode_scaled",
    "resize_crops",
]


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
        return DeviceStage(self, device=device or self.device, train=train, mixup=mixup, seed=seed, rank=rank)


def _payload(image: EncodedImage) -> torch.Tensor:
    """JPEG bytes as a 1-D uint8 tensor for the device decoder; other formats decoded here, uint8 CHW."""
    if image.format == "JPEG":
        return torch.frombuffer(bytearray(image.data), dtype=torch.uint8)
    return pil_to_chw(image.opened().convert("RGB"))


class DeviceTrainTransform(_Deferred):
    """Worker half of `decode="device"` training: bytes through, every random choice drawn here."""

    def __init__(self, sampler: ParamSampler, *, erase_mode: str, **common):
        super().__init__(output_size=sampler.output_size, **common)
        self.sampler = sampler
        self.erase_mode = erase_mode

    def __call__(self, image: EncodedImage) -> tuple[torch.Tensor, SampleParams, tuple[str, str]]:
        return _payload(image), self.sampler.sample(image.sized()), (image.url, image.key)


class DraftTrainTransform(_Deferred):
    """Worker half of `decode="draft"` training: decode at a reduced JPEG scale where the crop allows, crop and
    resize, then flip and RandAugment with timm's draws (`apply_recorded`: Pillow's results, mostly computed on the
    tensor); normalising, erasing and mixing run in the stage.

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
        crop = sampler.crop.get_params(image.sized(), sampler.crop.scale, sampler.crop.ratio)
        params = SampleParams(crop=crop, interpolation=sampler.sample_interpolation())
        try:
            picture = self.crop_resized(image, params)
        except Exception as exn:  # the decoders raise many types for damaged data
            params.erase = sampler.sample_erase()
            bad = BadData("corrupt_image", image.url, image.key, f"cannot decode image ({exn!r})")
            return bad, params, (image.url, image.key)
        # timm's draws in timm's order (flip, then RandAugment through timm's op objects), applied to the tensor
        if sampler.sample_flip():
            picture = picture.flip(-1)
        picture = apply_recorded(picture, sampler.sample_ops(), self.fill)
        params.erase = sampler.sample_erase()
        return picture.contiguous(), params, (image.url, image.key)

    def crop_resized(self, image: EncodedImage, params: SampleParams) -> torch.Tensor:
        """The sample's crop, resized to the output side: (3, side, side) uint8."""
        top, left, height, width = params.crop
        side, headroom = self.output_size, min(height, width) / self.output_size
        if headroom < 2 and image.format == "JPEG":
            # Full size: libjpeg-turbo through torchvision and torch's uint8 resampler, about twice as fast as
            # Pillow's decoder and resize here (same filter, antialiased; a level of rounding apart).
            return resize_crop(decode_jpeg(_payload(image), mode=ImageReadMode.RGB), params, side)
        picture = decode_scaled(image, headroom)
        sx, sy = picture.size[0] / image.size[0], picture.size[1] / image.size[1]
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        return pil_to_chw(picture.resize((side, side), PIL_FILTERS[params.interpolation], box=box))


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
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    re_mode: str = "pixel",
    device: torch.device | str = "cpu",
    draft: bool = False,
    **options: Any,
) -> DeviceTrainTransform | DraftTrainTransform:
    """timm's train transform split into worker-side choices and a device-side batch stage.

    Pass the result to `create_train_loader(transform=...)`; the loader then yields normalised, erased (and, with a
    batch transform, mixed) batches on `device`.

    Args:
        mean: normalisation mean.
        std: normalisation std.
        re_mode: random-erasing fill (`pixel`, `rand`, `const`).
        device: where the stage decodes (`decode="device"`) and finishes the batches.
        draft: decode in the workers at a reduced JPEG scale where the crop allows (`decode="draft"`).
        **options: the recipe, keywords of `create_train_transform` (which holds their defaults: DeiT's), but colour
            jitter, which timm drops under RandAugment (the recipe's setting), and `normalize`.
    """
    refused = sorted({"color_jitter", "normalize"} & options.keys())
    if refused:
        raise ValueError(f"create_device_train_transform: {', '.join(refused)} not offered (RandAugment, normalised)")
    auto_augment = options.get("auto_augment", "rand")
    if auto_augment and not auto_augment.startswith("rand"):
        raise ValueError(f"aug.auto_augment={auto_augment!r}: the device path supports RandAugment (rand-...) only")
    timm_transform = create_train_transform(**options, color_jitter=None, re_mode=re_mode, mean=mean, std=std)
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
