"""Evaluation data from plain folders: a flat folder of `ILSVRC2012_val_*.JPEG` files with a label file, or an
ImageFolder tree. Samples are `(image, target, key)` with the file stem as key; ranks take disjoint strided shares.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from pace.eval.predictions import UNLABELLED

log = logging.getLogger(__name__)

_VAL_FILE = re.compile(r"ILSVRC2012_val_\d{8}")


@dataclass
class FolderData:
    """A list of image files with their labels, and what the folder declares about itself.

    Args:
        samples: (path, target) pairs; the key of a sample is its file stem.
        num_classes: the number of classes of the label space, when known.
        expected_samples: how many samples the label file lists, when there is one.
        description: a one-line description for reports.
    """

    samples: list[tuple[Path, int]]
    num_classes: int | None
    expected_samples: int | None
    description: str


class KeyedImages(Dataset):
    """`(transform(image), target, key)` for a list of image files.

    Args:
        samples: (path, target) pairs.
        transform: applied to the RGB PIL image.
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable | None = None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, target, Path(path).stem


def _imagenet_class_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}


def _parse_label(value: str, wnids: dict[str, int], where: str) -> int:
    value = value.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    if value in wnids:
        return wnids[value]
    raise ValueError(f"{where}: label {value!r} is neither a class index nor an ImageNet synset id")


def read_val_labels(path: str | Path) -> dict[str, int]:
    """Labels of ImageNet val images by file stem.

    Accepted formats: Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`, the first synset of each box
    list is the label) and two-column text (`ILSVRC2012_val_00000001.JPEG 65`, file name or stem, then a class
    index in sorted-synset order or a synset id such as `n01751748`). Class indices follow timm's ImageNet order
    (sorted synsets), the order of an ImageFolder tree of ImageNet.

    Args:
        path: the label file.

    Raises:
        ValueError: naming the file and line of an entry that cannot be read, a repeated key, or the devkit's
            one-column `ILSVRC2012_validation_ground_truth.txt`, whose ids follow the devkit's own class order.
    """
    path = Path(path)
    wnids = _imagenet_class_index()
    labels: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
        f.seek(0)
        if first.replace(" ", "").startswith("ImageId,PredictionString"):
            rows = ((row["ImageId"], row["PredictionString"].split()[0]) for row in csv.DictReader(f))
        else:
            rows = (re.split(r"[\s,]+", line.strip()) for line in f if line.strip())
        for line_no, row in enumerate(rows, 1):
            where = f"{path}:{line_no}"
            if len(row) == 1:
                raise ValueError(
                    f"{where}: one column per line looks like the devkit's ILSVRC2012_validation_ground_truth.txt, "
                    "whose ids follow the devkit's class order, not the sorted-synset order models use; give "
                    "LOC_val_solution.csv or a two-column 'file label' list instead"
                )
            if len(row) != 2:
                raise ValueError(f"{where}: expected 'file label', got {' '.join(row)!r}")
            key = Path(row[0]).stem
            if key in labels:
                raise ValueError(f"{where}: {key} is listed twice")
            labels[key] = _parse_label(row[1], wnids, where)
    return labels


def imagenet_val_folder(root: str | Path, label_file: str | Path | None = None) -> FolderData:
    """A flat folder of `ILSVRC2012_val_*.JPEG` files, labelled from `label_file`.

    Args:
        root: the folder.
        label_file: see `read_val_labels`; None leaves every image unlabelled (ReaL can still be scored).

    Raises:
        FileNotFoundError: the folder holds no ImageNet val images.
        ValueError: an image has no entry in the label file.
    """
    root = Path(root)
    files = sorted(p for p in root.iterdir() if _VAL_FILE.fullmatch(p.stem) and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{root}: no ILSVRC2012_val_*.JPEG images")
    if label_file is None:
        log.warning("%s: no label file given; images are unlabelled, only label sets (ReaL) are scored", root)
        return FolderData([(p, UNLABELLED) for p in files], 1000, None, f"ImageNet val folder {root} (unlabelled)")
    labels = read_val_labels(label_file)
    missing = [p.stem for p in files if p.stem not in labels]
    if missing:
        raise ValueError(f"{label_file} has no label for {len(missing)} images in {root}, e.g. {missing[:3]}")
    samples = [(p, labels[p.stem]) for p in files]
    return FolderData(samples, 1000, len(labels), f"ImageNet val folder {root}, labels {label_file}")


def image_folder(root: str | Path) -> FolderData:
    """An ImageFolder tree (`root/<class>/<image>`); classes are the sorted sub-folder names."""
    root = Path(root)
    classes, class_to_idx = find_classes(str(root))
    samples = [(Path(p), t) for p, t in make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)]
    if not samples:
        raise FileNotFoundError(f"{root}: no images in the ImageFolder layout root/<class>/<image>")
    return FolderData(samples, len(classes), None, f"ImageFolder {root} ({len(classes)} classes)")


def folder_loader(
    data: FolderData,
    transform: Callable,
    *,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over this rank's share of the folder: samples `rank, rank + world_size, ...` (no padding, so each
    sample is evaluated exactly once and ranks may hold one sample more or less than others).

    Args:
        data: the folder's samples.
        transform: the eval transform.
        batch_size: per-rank batch size.
        num_workers: loader worker processes.
        rank: this process's rank.
        world_size: number of processes.
        pin_memory: pin host memory (for CUDA).
    """
    share = data.samples[rank::world_size]
    return DataLoader(
        KeyedImages(share, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
    )
