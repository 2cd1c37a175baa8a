"""Small image folders and shards for the data tests (helpers only; no tests here)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from pace.data import EncodeOptions, ShardPlan, shard_image_folders


def jpeg_bytes(seed: int, size: tuple[int, int] = (20, 16), quality: int = 90) -> bytes:
    """A random-content JPEG (width, height)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_image_folder(root: Path, *, classes: int = 3, per_class: int = 10, seed: int = 0) -> dict[str, tuple]:
    """An ImageFolder tree `root/c<k>/img_<k>_<i>.jpg` of varied sizes; returns stem -> (label, path)."""
    files = {}
    for label in range(classes):
        directory = root / f"n{label:08d}"
        directory.mkdir(parents=True)
        for i in range(per_class):
            path = directory / f"img_{label}_{i:04d}.JPEG"
            path.write_bytes(jpeg_bytes(seed * 100_000 + label * 1000 + i, size=(16 + i % 7, 12 + i % 5)))
            files[path.name.split(".")[0]] = (label, path)
    return files


def write_shards(
    out: Path, folder: Path, *, max_count: int = 7, prefix: str | None = None, split: str = "train", **kwargs
) -> dict:
    """Shards of one ImageFolder split, stored as is."""
    plan = ShardPlan(prefix=prefix, max_count=max_count)
    return shard_image_folders(out, {split: folder}, plan=plan, options=EncodeOptions(), **kwargs)


def make_uneven_shards(root: Path) -> Path:
    """6 uneven shards (sizes 11, 11, 11, 11, 11, 5) of 60 images in 4 classes under `root/out`."""
    make_image_folder(root / "src", classes=4, per_class=15)
    write_shards(root / "out", root / "src", max_count=11)
    return root / "out"


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A tar of samples `{"__key__": key, ext: bytes, ...}` written with the standard library."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def fixed_transform(size: int = 8):
    """Deterministic resize to size x size, float tensor."""
    return transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])


def random_transform(size: int = 8):
    """A random crop + flip + colour jitter (python and torch RNGs), for determinism tests."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.3, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.4, 0.4, 0.4),
            transforms.PILToTensor(),
        ]
    )


def batches_equal(a: list[tuple], b: list[tuple]) -> bool:
    """Two lists of batches hold the same tensors (and keys) in the same order."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            same = torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
            if not same:
                return False
    return True


def decode_file(path: Path, size: int = 8) -> torch.Tensor:
    """The file decoded and transformed independently of the pipeline."""
    return fixed_transform(size)(Image.open(path).convert("RGB"))
