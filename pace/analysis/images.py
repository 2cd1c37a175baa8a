"""Images for the analysis scripts: files and folders, scikit-image's sample photographs, the model's transform."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn

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


def model_transform(model: nn.Module, *, img_size: int | None = None, crop_pct: float | None = None):
    """timm's evaluation transform for the model (its pretrained_cfg's mean, std and interpolation).

    Args:
        model: A timm model.
        img_size: Square input size; None for the model's default.
        crop_pct: Centre-crop fraction; None for the model's default, 1.0 to keep the whole shorter side.

    Returns:
        ``(transform, data_config)``: a PIL → normalised (3, H, W) tensor callable and timm's resolved config.
    """
    overrides = {}
    if img_size is not None:
        overrides["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    config = resolve_data_config(args=overrides, model=model)
    return create_transform(**config, is_training=False), config


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
