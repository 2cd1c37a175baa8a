"""A small generated image dataset for the offline quickstart: ten classes of shapes and textures.

Each image is a random colour gradient with noise and one object drawn in a random colour, position, size and
rotation; the class is the object's form (disk, ring, square, frame, triangle, cross, star) or texture (stripes,
checkerboard, dots). Colour and placement carry no class information, so a model has to learn form, which a
small ViT does within minutes at 32-64 px. Every image is a deterministic function of (seed, split, index).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from pace.data.info import INFO_NAME, read_info
from pace.data.writer import EncodeOptions, ShardPlan, SourceImage, write_dataset

logger = logging.getLogger(__name__)

QUICKSTART_CLASSES = ("checker", "cross", "disk", "dots", "frame", "ring", "square", "star", "stripes", "triangle")
DEFAULT_DIR = "data/generated/shapes"
_SPLIT_CODES = {"train": 0, "val": 1}


def render_image(*, seed: int, split: str, index: int, image_size: int = 64) -> tuple[np.ndarray, int]:
    """Render one image.

    Args:
        seed: dataset seed.
        split: `train` or `val`.
        index: image index within the split; its class is `index % 10`.
        image_size: side in pixels.

    Returns:
        (image as a (H, W, 3) uint8 array, class index).
    """
    label = index % len(QUICKSTART_CLASSES)
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    S = image_size
    y, x = _pixel_centres(S)  # (S, S) each
    background = _gradient(rng, x, y, S)
    colour = _contrasting_colour(rng, background.mean(axis=(0, 1)))
    cx, cy = rng.uniform(0.35 * S, 0.65 * S, size=2).astype(np.float32)
    radius = np.float32(rng.uniform(0.2, 0.33) * S)
    theta = np.float32(rng.uniform(0, 2 * np.pi))
    # Coordinates in the object's rotated frame.
    u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
    alpha = _coverage(QUICKSTART_CLASSES[label], u, v, radius, theta, S)[..., None]  # (S, S, 1)
    image = background + alpha * (colour - background)
    image += 28.0 * (rng.random(image.shape, dtype=np.float32) - 0.5)  # uniform noise, std 8
    return np.clip(image, 0, 255).astype(np.uint8), label


def render_jpeg(*, seed: int, split: str, index: int, image_size: int = 64, quality: int = 90) -> bytes:
    """`render_image` encoded as JPEG."""
    array, _ = render_image(seed=seed, split=split, index=index, image_size=image_size)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_quickstart_dataset(
    out_dir: str | Path = DEFAULT_DIR,
    *,
    seed: int = 0,
    image_size: int = 64,
    train_per_class: int = 400,
    val_per_class: int = 50,
    shard_size: int = 500,
    quality: int = 90,
    workers: int = 2,
) -> dict:
    """Write the generated dataset as JPEG shards (`train`, `val` splits) with `_info.json`; idempotent.

    When `out_dir` already holds this dataset with the same parameters, nothing is written. A directory holding
    a generated dataset with other parameters is rewritten; any other non-empty directory is refused.

    Args:
        out_dir: output directory.
        seed: generation seed.
        image_size: image side in pixels.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        shard_size: samples per shard.
        quality: JPEG quality.
        workers: writer processes.

    Returns:
        The dataset's info dict.
    """
    out_dir = Path(out_dir)
    params = {
        "seed": seed,
        "image_size": image_size,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "shard_size": shard_size,
        "quality": quality,
    }
    counts = {"train": train_per_class, "val": val_per_class}
    existing = read_info(out_dir) if (out_dir / INFO_NAME).is_file() else None
    # The info file records the parameters under "synthetic", the key datasets already on disk carry.
    if existing is not None and existing.get("synthetic") == params:
        missing = _missing(out_dir, existing, {split: n * len(QUICKSTART_CLASSES) for split, n in counts.items()})
        if not missing:
            logger.info("generated dataset already present in %s", out_dir)
            return existing
        logger.warning("generated dataset in %s is incomplete (%s): writing it again", out_dir, missing)
    render = partial(render_jpeg, seed=seed, image_size=image_size, quality=quality)
    splits = {split: _listed_images(split, per_class, render) for split, per_class in counts.items()}
    return write_dataset(
        out_dir,
        splits,
        classes=QUICKSTART_CLASSES,
        plan=ShardPlan(prefix="shapes", max_count=shard_size, seed=seed),
        options=EncodeOptions(verify=False),
        workers=workers,
        overwrite=existing is not None and "synthetic" in existing,
        sources=dict.fromkeys(splits, "generated"),
        extra_info={"synthetic": params},
    )


def _listed_images(split: str, per_class: int, render: Callable[..., bytes]) -> list[SourceImage]:
    """The split's images for the writer, each rendered in a writer process when it is written."""
    return [
        SourceImage(
            key=f"{split}_{index:06d}",
            label=index % len(QUICKSTART_CLASSES),
            class_name=QUICKSTART_CLASSES[index % len(QUICKSTART_CLASSES)],
            render=partial(render, split=split, index=index),
            filename=f"{split}_{index:06d}.jpg",
        )
        for index in range(per_class * len(QUICKSTART_CLASSES))
    ]


def _missing(out_dir: Path, info: dict, samples: dict[str, int]) -> str | None:
    """What an existing generated dataset lacks (a split, samples, a shard file), or None when it is whole."""
    for split, count in samples.items():
        entry = info["splits"].get(split)
        if entry is None:
            return f"no {split} split"
        if entry["num_samples"] != count or sum(entry["shard_lengths"]) != count:
            return f"{split} split has {entry['num_samples']} of {count} samples"
        for name in entry["filenames"]:
            if not (out_dir / name).is_file():
                return f"shard {name} is missing"
    return None


@lru_cache(maxsize=4)
def _pixel_centres(S: int) -> np.ndarray:
    return np.mgrid[0:S, 0:S].astype(np.float32) + 0.5


def _gradient(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, S: int) -> np.ndarray:
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = np.float32(rng.uniform(0, 2 * np.pi))
    t = ((x - S / 2) * np.cos(angle) + (y - S / 2) * np.sin(angle)) / S + 0.5  # (S, S) in about [0, 1]
    return start + np.clip(t, 0, 1)[..., None] * (end - start)  # (S, S, 3)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    candidates = rng.uniform(0, 255, size=(16, 3)).astype(np.float32)
    contrast = np.abs(candidates @ luma - background @ luma)
    if contrast.max() <= 60:
        return np.full(3, 255.0 if background @ luma < 128 else 0.0, dtype=np.float32)
    return candidates[np.argmax(contrast > 60)]


def _coverage(form: str, u: np.ndarray, v: np.ndarray, r: float, theta: float, S: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, from a signed distance (negative inside)."""
    rho = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    if form == "disk":
        sdf = rho - r
    elif form == "ring":
        sdf = np.abs(rho - 0.78 * r) - 0.22 * r
    elif form == "square":
        sdf = box - 0.8 * r
    elif form == "frame":
        sdf = np.abs(box - 0.68 * r) - 0.16 * r
    elif form == "triangle":
        angles = np.arange(3) * 2 * np.pi / 3
        sdf = np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) - 0.5 * r
    elif form == "cross":
        arm = 0.28 * r
        sdf = np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - arm), np.maximum(np.abs(u) - arm, np.abs(v) - r))
    elif form == "star":
        phi = np.arctan2(v, u)
        sdf = (rho - r * (0.6 + 0.4 * np.cos(5 * phi))) * 0.7
    else:
        # Textures fill a rotated rectangle larger than the shapes.
        period = 0.18 * S
        inside = np.maximum(np.abs(u) - 1.5 * r, np.abs(v) - 1.1 * r)
        if form == "stripes":
            pattern = np.cos(2 * np.pi * u / period)
        elif form == "checker":
            pattern = np.cos(np.pi * u / (0.6 * period)) * np.cos(np.pi * v / (0.6 * period))
        elif form == "dots":
            du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
            pattern = 0.3 - np.hypot(du, dv)
        else:
            raise ValueError(f"unknown form {form!r}")
        sdf = np.maximum(inside, -np.sign(pattern) * np.minimum(np.abs(pattern) * period / 2, 1.0))
    return np.clip(0.5 - sdf, 0.0, 1.0)
