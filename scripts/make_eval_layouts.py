"""Write robustness-set folder layouts from a split of any shard folder, to try the evaluators offline.

    python scripts/make_eval_layouts.py data/generated/shapes runs/layouts --split val --max-images 100

From the split's first images it writes, keeping each image's class folder:
  plain/<class>/<key>.png                       the images as they are (an ImageFolder of the split)
  sketch/<class>/<key>.png                      grey edge drawings (an ImageNet-Sketch-style tree)
  subset/<class>/<key>.png + subset_classes.txt colour-inverted images of the first half of the classes, and
                                                those class indices (an ImageNet-A/R-style 200-of-1000 subset)
  c/<corruption>/<severity>/<class>/<key>.png   gaussian_noise, defocus_blur (Gaussian blur) and contrast at
                                                severities 1-5 (an ImageNet-C-style tree)
These are stand-ins with the real sets' layouts, not the real sets.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

CORRUPTIONS = {
    "gaussian_noise": lambda img, s: _noise(img, (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]),
    "defocus_blur": lambda img, s: img.filter(ImageFilter.GaussianBlur((0.5, 0.8, 1.2, 1.7, 2.4)[s - 1])),
    "contrast": lambda img, s: _contrast(img, (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]),
}


def _noise(img: Image.Image, sigma: float) -> Image.Image:
    rng = np.random.default_rng(zlib.crc32(img.tobytes()))  # the same noise on every run
    x = np.asarray(img, dtype=np.float64) / 255
    return Image.fromarray((np.clip(x + rng.normal(0, sigma, x.shape), 0, 1) * 255).astype(np.uint8))


def _contrast(img: Image.Image, factor: float) -> Image.Image:
    x = np.asarray(img, dtype=np.float64)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return Image.fromarray(np.clip((x - mean) * factor + mean, 0, 255).astype(np.uint8))


def read_split(root: Path, split: str, limit: int) -> tuple[list[str], list[tuple[str, int, Image.Image]]]:
    """The class names and the first `limit` (key, label, image) samples of a split."""
    info = json.loads((root / "_info.json").read_text())
    samples: dict[str, dict] = {}
    for name in info["splits"][split]["filenames"]:
        with tarfile.open(root / name) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        if len(samples) >= limit:
            break
    out = []
    for key in sorted(samples)[:limit]:
        entry = samples[key]
        data = next(v for k, v in entry.items() if k in ("jpg", "png", "webp"))
        out.append((key, int(entry["cls"]), Image.open(io.BytesIO(data)).convert("RGB")))
    return info["classes"], out


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path, help="a shard folder with _info.json")
    parser.add_argument("out", type=Path, help="output folder (sketch/, subset/, c/)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-images", type=int, default=100)
    args = parser.parse_args(argv)
    classes, samples = read_split(args.shards, args.split, args.max_images)
    subset = list(range(len(classes) // 2))
    for key, label, img in samples:
        cls = classes[label]
        _save(img, args.out / "plain" / cls / f"{key}.png")
        edges = ImageOps.invert(ImageOps.grayscale(img).filter(ImageFilter.FIND_EDGES)).convert("RGB")
        _save(edges, args.out / "sketch" / cls / f"{key}.png")
        if label in subset:
            _save(ImageOps.invert(img), args.out / "subset" / cls / f"{key}.png")
        for corruption, fn in CORRUPTIONS.items():
            for severity in range(1, 6):
                _save(fn(img, severity), args.out / "c" / corruption / str(severity) / cls / f"{key}.png")
    (args.out / "subset_classes.txt").write_text("".join(f"{i}\n" for i in subset))
    print(f"{len(samples)} images -> {args.out}/sketch, subset ({len(subset)} classes), c ({len(CORRUPTIONS)} x 5)")


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    main()
