"""A sample's random augmentation choices, drawn in a CPU worker with timm's own samplers in timm's order.

`ParamSampler` takes timm's train transform apart (RandomResizedCrop, flip, RandAugment, random erasing) and draws
every choice of one sample into a `SampleParams`; the decode paths of `pace.data.device_augment` then apply them
(in the worker, or on the training device in batches).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import RandomHorizontalFlip

INTERPOLATION = {
    Image.Resampling.NEAREST: "nearest",
    Image.Resampling.BILINEAR: "bilinear",
    Image.Resampling.BICUBIC: "bicubic",
}
PIL_FILTERS = {name: code for code, name in INTERPOLATION.items()}
TF_INTERPOLATION = {"nearest": TF.InterpolationMode.NEAREST, "bilinear": TF.InterpolationMode.BILINEAR}
TF_INTERPOLATION["bicubic"] = TF.InterpolationMode.BICUBIC
GEOMETRIC_OPS = {
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x_rel",
    "translate_y_rel",
    "translate_x_abs",
    "translate_y_abs",
}
SUPPORTED_OPS = GEOMETRIC_OPS | {
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
        header: the image opened lazily by Pillow (size and format read, pixels not); None for a JPEG whose size
            was read from its frame header (`jpeg_size`), opened by `opened` when needed.
        url: the shard it came from.
        key: the sample's key.
        jpeg_size: (width, height) of a JPEG read from its frame header.
    """

    data: bytes
    header: Image.Image | None = None
    url: str = ""
    key: str = ""
    jpeg_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.header.size if self.header is not None else self.jpeg_size

    @property
    def format(self) -> str | None:
        """Pillow's format name (`JPEG`, `PNG`, ...)."""
        return self.header.format if self.header is not None else "JPEG"

    def opened(self) -> Image.Image:
        """The image opened lazily by Pillow."""
        if self.header is None:
            self.header = Image.open(io.BytesIO(self.data))
        return self.header

    def sized(self) -> Image.Image | torch.Tensor:
        """Something timm's and torchvision's size readers (`get_image_size`) take: the header, or a tensor of the
        image's shape that holds no memory (a zero-dimensional tensor expanded)."""
        if self.header is not None:
            return self.header
        width, height = self.jpeg_size
        return torch.zeros(()).expand(height, width)


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
        self.randaug = _recording(_take(steps, RandAugment))
        self.erasing = _take(steps, RandomErasing)
        unsupported = [
            type(step).__name__ for step in steps if type(step).__name__ not in ("MaybeToTensor", "Normalize")
        ]
        if unsupported:
            raise ValueError(f"the device path does not support these train-transform steps: {unsupported}")
        self.output_size = self.crop.size[0]

    def sample(self, header: Image.Image | torch.Tensor) -> SampleParams:
        """All of one sample's choices.

        Args:
            header: the lazily opened full-size image, or `EncodedImage.sized()` (timm's crop sampler reads the
                size only).
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
        return INTERPOLATION.get(interpolation, "bicubic")

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
        if name not in SUPPORTED_OPS:
            raise ValueError(f"RandAugment op {op.name} ({name}) has no device implementation")
        clone = copy.copy(op)
        # A partial of a module function, not a closure: the worker processes receive the transform pickled.
        clone.aug_fn = functools.partial(_record, name.lstrip("_"))
        recording.ops.append(clone)
    return recording


def _record(name: str, sink: list, *args, **kwargs) -> list:
    """What a recording op does in place of timm's `name` op: append `(name, args, interpolation)` to `sink`."""
    interpolation = None
    if name in GEOMETRIC_OPS:  # timm picks the resample filter inside the op, after the magnitude
        resample = kwargs.get("resample", Image.Resampling.BILINEAR)
        if isinstance(resample, (list, tuple)):
            resample = random.choice(resample)
        interpolation = INTERPOLATION.get(resample, "bilinear")
    sink.append((name, tuple(args), interpolation))
    return sink
