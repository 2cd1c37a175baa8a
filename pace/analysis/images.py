"""Images for the analysis scripts: files and folders, webdataset shards, scikit-image's sample photographs, the
model's transform."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from pace.data import create_eval_loader, create_eval_transform, resolve_shards
from pace.eval.transform import eval_data_config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# Photographs bundled with scikit-image (no download): a person, an object on a table, an animal.
DEMO_IMAGES = ("astronaut", "coffee", "chelsea")


def image_files(sources: Sequence[str | Path], *, limit: int | None = None) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the folders named, each once.

    Args:
        sources: Files and folders.
        limit: Keep at most this many files (the first in order).

    Returns:
        The files.
    """
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {source}")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"image path {source} does not exist")
    unique = list({p.resolve(): p for p in files}.values())  # in order of first occurrence
    return unique[:limit] if limit is not None else unique


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB.

    Args:
        path: JPEG, PNG or any format PIL reads.

    Returns:
        The image.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({e})") from e


def demo_images(names: Sequence[str] = DEMO_IMAGES) -> dict[str, Image.Image]:
    """scikit-image's sample photographs (shipped with the package, so this works offline).

    Args:
        names: Names of functions in ``skimage.data``.

    Returns:
        Name → RGB image.
    """
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the demo images come from scikit-image: pip install scikit-image") from e
    out = {}
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"skimage.data has no image {name!r}")
        out[name] = Image.fromarray(np.asarray(loader())).convert("RGB")
    return out


def model_transform(
    model: nn.Module,
    *,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
):
    """timm's evaluation transform for the model, as `pace-eval` builds it (`pace.eval.transform`): the model's
    pretrained_cfg (mean, std, interpolation, crop) with the settings given here taking precedence.

    Args:
        model: A timm model.
        img_size: Square input size; None for the model's default.
        crop_pct: Centre-crop fraction; None for the model's default, 1.0 to keep the whole shorter side.
        interpolation: Resize interpolation; None for the model's default.

    Returns:
        ``(transform, data_config)``: a PIL → normalised (3, H, W) tensor callable and the resolved config.
    """
    overrides = {"input_size": img_size, "crop_pct": crop_pct, "interpolation": interpolation}
    config = eval_data_config(model, overrides)
    return create_eval_transform(**config), config


@dataclass(frozen=True)
class ShardImages:
    """The first images of a webdataset split, transformed for the model.

    Args:
        images: Normalised (B, 3, H, W).
        keys: Each sample's key, in reading order.
        labels: Each sample's class index.
        classes: Class names by index, when the shards' info file lists them.
        description: Where they came from, for reports.
    """

    images: Tensor
    keys: list[str]
    labels: list[int]
    classes: tuple[str, ...] | None
    description: str


def shard_images(
    source: str | Path, *, transform: Callable, max_images: int, split: str = "val", batch_size: int = 64
) -> ShardImages:
    """Read the first ``max_images`` samples of a split through the project's evaluation loader.

    The loader reads in one process, shard by shard in their stored order, so the same images come back every
    time; bad samples are skipped as in evaluation.

    Args:
        source: A shard directory with ``_info.json``, a brace pattern, a list file (see
            `pace.data.resolve_shards`).
        transform: PIL image → normalised (3, H, W) tensor.
        max_images: Read at most this many images.
        split: Split name in the info file.
        batch_size: Images decoded per batch.

    Returns:
        The images, their keys and labels.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be positive, got {max_images}")
    local = str(source)
    shards = resolve_shards(local, split=split)
    # Missing local shards fail here, each named (`FileNotFoundError`).
    loader = create_eval_loader(
        local,
        batch_size=min(batch_size, max_images),
        transform=transform,
        split=split,
        num_workers=0,
    )
    images: list[Tensor] = []
    keys: list[str] = []
    labels: list[int] = []
    for batch, targets, batch_keys in loader:
        take = max_images - len(keys)
        images.append(batch[:take])
        keys += list(batch_keys[:take])
        labels += targets[:take].tolist()
        if len(keys) == max_images:
            break
    if not keys:
        raise ValueError(f"{local} split {split!r}: no readable images")
    where = shards.info_path or f"{len(shards.urls)} shards"
    description = f"{len(keys)} images of webdataset {local} split {split} ({where})"
    return ShardImages(torch.cat(images), keys, labels, shards.classes, description)


def to_display(images: Tensor, *, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation: what the model saw, as uint8 RGB.

    Args:
        images: Normalised (B, 3, H, W).
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation.

    Returns:
        (B, H, W, 3) uint8.
    """
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    rgb = (images.cpu() * s + m).clamp(0, 1)
    return (rgb.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
