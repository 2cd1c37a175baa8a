"""Evaluation data from plain folders: a flat folder of `ILSVRC2012_val_*.JPEG` files with a label file, or an
ImageFolder tree. Samples are `(image, target, key)` with the file stem as key; ranks take disjoint strided shares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pace.data import imagenet_classes, read_label_file
from pace.data.image_folders import (
    IMAGE_SUFFIXES,
    relabel_images,
    scan_corruption_folder,
    scan_flat_folder,
    scan_image_folder,
)
from pace.data.workers import check_sendable, init_worker, worker_context
from pace.distributed import DistEnv
from pace.eval.predictions import UNLABELLED

log = logging.getLogger(__name__)


@dataclass
class FolderData:
    """Image files with their labels and keys, and what the folder declares about itself.

    Args:
        samples: (path, target, key) triples.
        num_classes: the number of classes of the label space, when known.
        expected_samples: how many samples the label file lists, when there is one.
        description: a one-line description for reports.
    """

    samples: list[tuple[str, int, str]]
    num_classes: int | None
    expected_samples: int | None
    description: str


class KeyedImages(Dataset):
    """`(transform(image), target, key)` for a list of image files.

    Args:
        samples: (path, target, key) triples.
        transform: applied to the RGB PIL image.
    """

    def __init__(self, samples: list[tuple[str, int, str]], transform: Callable | None = None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target, key = self.samples[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, target, key


def imagenet_val_folder(root: str | Path, label_file: str | Path | None = None) -> FolderData:
    """A flat folder of ImageNet val images (`ILSVRC2012_val_00000001.JPEG`, ...), keyed by file stem.

    Args:
        root: the folder.
        label_file: Kaggle's `LOC_val_solution.csv` or `file label` lines (see `pace.data.read_label_file`); class
            indices follow timm's ImageNet order (sorted synsets). None leaves every image unlabelled, so only
            label sets (ReaL) are scored.

    Raises:
        FileNotFoundError: the folder holds no images.
        ValueError: an image has no entry in the label file, or two images share a stem.
    """
    if label_file is not None:
        labels = read_label_file(label_file)
        images = scan_flat_folder(root, labels=labels, classes=imagenet_classes())
        samples = [(image.path, image.label, image.key) for image in images]
        return FolderData(samples, 1000, len(labels), f"ImageNet val folder {root}, labels {label_file}")
    files = sorted(p for p in Path(root).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root} holds no images")
    log.warning("%s: no label file given; images are unlabelled, only label sets (ReaL) are scored", root)
    samples = [(str(p), UNLABELLED, p.name.split(".", 1)[0]) for p in files]
    return FolderData(samples, 1000, None, f"ImageNet val folder {root} (unlabelled)")


def image_folder(root: str | Path, classes: list[str] | None = None) -> FolderData:
    """An ImageFolder tree (`root/<class>/<image>`): classes are the sorted sub-folder names, keys the file stems
    (relative paths where stems repeat across classes). Folders named by class index, as ImageNetV2 ships
    (`0` ... `999`), keep that index rather than their place in string order (where `10` sorts before `2`).

    Args:
        root: the tree.
        classes: the label space in index order (e.g. the 1000 ImageNet wnids, for ImageNet-A/R/Sketch, whose
            folders are wnids); None: the folders themselves.
    """
    folder_classes, images = scan_image_folder(root)
    if classes is not None:
        images = relabel_images(folder_classes, images, classes)
        samples = [(image.path, image.label, image.key) for image in images]
        return FolderData(samples, len(classes), None, f"ImageFolder {root} ({len(folder_classes)} classes by name)")
    classes = folder_classes
    if all(name.isdigit() for name in classes):
        index = [int(name) for name in classes]
        samples = [(image.path, index[image.label], image.key) for image in images]
        return FolderData(samples, max(index) + 1, None, f"ImageFolder {root} (classes by folder index)")
    samples = [(image.path, image.label, image.key) for image in images]
    return FolderData(samples, len(classes), None, f"ImageFolder {root} ({len(classes)} classes)")


def corruption_folder(root: str | Path, classes: list[str] | None = None) -> FolderData:
    """An ImageNet-C tree (`root/<corruption>/<severity>/<wnid>/<image>`), keyed `<corruption>/<severity>/<stem>`.

    Args:
        root: the folder of corruption folders.
        classes: the label space in index order (the 1000 ImageNet wnids); None: the sorted class-folder names.
    """
    if classes is None:
        classes = sorted({p.name for p in Path(root).glob("*/*/*") if p.is_dir()})
    images = scan_corruption_folder(root, classes=classes)
    samples = [(image.path, image.label, image.key) for image in images]
    return FolderData(samples, len(classes), None, f"corruption folder {root}")


def folder_loader(
    data: FolderData,
    transform: Callable,
    *,
    batch_size: int,
    num_workers: int,
    env: DistEnv | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over this rank's share of the folder: samples `rank, rank + world_size, ...` (no padding, so each
    sample is evaluated exactly once and ranks may hold one sample more or less than others).

    Args:
        data: the folder's samples.
        transform: the eval transform.
        batch_size: per-rank batch size.
        num_workers: loader worker processes.
        env: this process's place in the job (default: a single process).
        pin_memory: pin host memory (for CUDA).
    """
    env = env or DistEnv()
    share = data.samples[env.rank :: env.world_size]
    dataset = KeyedImages(share, transform)
    if num_workers > 0:
        check_sendable(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        # Workers come from a fork server, never from forking this threaded process (see pace.data.workers).
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        worker_init_fn=init_worker if num_workers > 0 else None,
    )
