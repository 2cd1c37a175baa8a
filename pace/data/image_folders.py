"""Image folders -> the images to write: ImageFolder trees, flat labelled folders, ImageNet-C trees, and
`shard_image_folders`, which scans them and writes their shards (`pace-make-shards` in Python).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pace.data.imagenet import imagenet_classes, read_label_file
from pace.data.writer import EncodeOptions, ShardPlan, SourceImage, write_dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def scan_image_folder(root: str | Path, *, key_style: str = "auto") -> tuple[list[str], list[SourceImage]]:
    """List an ImageFolder tree `root/<class>/**/<image>` (class index = sorted class-directory order).

    Args:
        root: the split directory.
        key_style: `stem` (file stem, e.g. ImageNet's `n01440764_10026`), `path` (relative path without
            suffix, for trees whose stems repeat across classes), or `auto` (stem when unique, else path).

    Returns:
        (classes, images).
    """
    root = Path(root)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class subdirectories")
    found: list[tuple[Path, int, str]] = []
    for label, name in enumerate(classes):
        files = _image_files(root / name, recursive=True)
        if not files:
            raise FileNotFoundError(f"class directory {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        found.extend((path, label, name) for path in files)
    keys = _make_keys([path.relative_to(root) for path, _, _ in found], key_style)
    images = [
        SourceImage(key=key, label=label, class_name=name, path=str(path), filename=str(path.relative_to(root)))
        for key, (path, label, name) in zip(keys, found)
    ]
    return classes, images


def scan_flat_folder(root: str | Path, *, labels: Mapping[str, str], classes: Sequence[str]) -> list[SourceImage]:
    """List a flat folder (ImageNet validation layout) labelled by a stem -> wnid-or-index mapping.

    Args:
        root: directory holding the images directly.
        labels: file stem -> class name or class index as text (see `read_label_file`).
        classes: class names in index order.
    """
    root = Path(root)
    index = {name: i for i, name in enumerate(classes)}
    images, unlabelled = [], []
    for path in _image_files(root, recursive=False):
        stem = path.name.split(".", 1)[0]
        if stem not in labels:
            unlabelled.append(path.name)
            continue
        label = _label_index(labels[stem], index, where=f"label of {path}")
        images.append(SourceImage(stem, label, classes[label], path=str(path), filename=path.name))
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} images in {root} have no label, e.g. {', '.join(unlabelled[:5])}")
    if not images:
        raise FileNotFoundError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    _make_keys([Path(image.key) for image in images], "stem")  # raises on duplicate stems
    return images


def scan_corruption_folder(root: str | Path, *, classes: Sequence[str]) -> list[SourceImage]:
    """List an ImageNet-C tree `root/<corruption>/<severity>/<wnid>/<image>`.

    The same validation image appears under every corruption and severity, so keys are
    `<corruption>/<severity>/<stem>`; labels are the wnids' places in `classes`.

    Args:
        root: the folder holding one folder per corruption.
        classes: class names (wnids) in index order.

    Raises:
        FileNotFoundError: no corruption folders, or a class folder without images.
        ValueError: a severity folder that is not a number, or a class folder that is not in `classes`.
    """
    root = Path(root)
    index = {name: i for i, name in enumerate(classes)}
    found: list[tuple[Path, int, str]] = []
    for corruption in sorted(p for p in root.iterdir() if p.is_dir()):
        for severity in sorted(p for p in corruption.iterdir() if p.is_dir()):
            if not severity.name.isdigit():
                raise ValueError(f"{severity}: expected severity folders named 1..5 under {corruption}")
            for folder in sorted(p for p in severity.iterdir() if p.is_dir()):
                if folder.name not in index:
                    raise ValueError(f"class folder {folder} is not in the class list")
                files = _image_files(folder, recursive=True)
                if not files:
                    raise FileNotFoundError(f"class directory {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
                found.extend((path, index[folder.name], folder.name) for path in files)
    if not found:
        raise FileNotFoundError(f"{root} has no <corruption>/<severity>/<class>/ folders with images")
    keys = _make_keys([path.relative_to(root).parent.parent / path.name for path, _, _ in found], "path")
    return [
        SourceImage(key=key, label=label, class_name=name, path=str(path), filename=str(path.relative_to(root)))
        for key, (path, label, name) in zip(keys, found)
    ]


LAYOUTS = ("folder", "corruptions")
IMAGENET = "imagenet"  # `classes_file` value: timm's 1000 ImageNet-1k wnids


def shard_image_folders(
    out_dir: str | Path,
    splits: Mapping[str, str | Path],
    *,
    labels: Mapping[str, str | Path] | None = None,
    layouts: Mapping[str, str] | None = None,
    classes_file: str | Path | None = None,
    key_style: str = "auto",
    plan: ShardPlan | None = None,
    options: EncodeOptions | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Write shards for image folders: `pace-make-shards` in Python.

    Args:
        out_dir: output directory (created; must be empty unless overwrite).
        splits: split name -> directory, an ImageFolder tree or a flat folder (the latter needs `labels`).
        labels: split name -> label file for flat folders (see `read_label_file`).
        layouts: split name -> `folder` (default) or `corruptions` (ImageNet-C: `<corruption>/<severity>/<wnid>/`,
            see `scan_corruption_folder`; needs `classes_file`).
        classes_file: class names in index order, one per line, or `imagenet` for timm's ImageNet-1k wnids (so
            ImageNet-A/R/Sketch/C folders get ImageNet-1k labels); default: the sorted class directories of the
            ImageFolder splits, else the sorted wnids of the label files.
        key_style: see `scan_image_folder`.
        plan: how the samples are ordered, cut into shards and named (`pace.data.writer.ShardPlan`).
        options: how images are stored.
        workers: writer processes.
        overwrite: write into a non-empty directory, replacing the shards of the splits written now.

    Returns:
        The info dict written to `<out_dir>/_info.json`.
    """
    classes, samples = scan_splits(
        splits, labels=labels, layouts=layouts, classes_file=classes_file, key_style=key_style
    )
    return write_dataset(
        out_dir,
        samples,
        classes=classes,
        plan=plan,
        options=options,
        workers=workers,
        overwrite=overwrite,
        sources={split: str(directory) for split, directory in splits.items()},
    )


def scan_splits(
    splits: Mapping[str, str | Path],
    *,
    labels: Mapping[str, str | Path] | None = None,
    layouts: Mapping[str, str] | None = None,
    classes_file: str | Path | None = None,
    key_style: str = "auto",
) -> tuple[list[str], dict[str, list[SourceImage]]]:
    """List the images of every split on one class list (arguments as for `shard_image_folders`).

    Returns:
        (classes, split name -> images).
    """
    labels = dict(labels or {})
    layouts = dict(layouts or {})
    unknown = (set(labels) | set(layouts)) - set(splits)
    if unknown:
        raise ValueError(f"labels or layouts given for unknown splits {sorted(unknown)}; splits are {sorted(splits)}")
    bad = {split: layout for split, layout in layouts.items() if layout not in LAYOUTS}
    if bad:
        raise ValueError(f"unknown layouts {bad}; known: {LAYOUTS}")
    corruptions = {split for split, layout in layouts.items() if layout == "corruptions"}
    if corruptions and classes_file is None:
        raise ValueError(f"splits {sorted(corruptions)} use the corruptions layout: give the class list (imagenet)")
    folder_classes: dict[str, tuple[list[str], list[SourceImage]]] = {}
    for split, directory in splits.items():
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"split {split}: directory not found: {directory}")
        if split not in labels and split not in corruptions:
            folder_classes[split] = scan_image_folder(directory, key_style=key_style)
    classes = _choose_classes(classes_file, folder_classes, labels)
    samples: dict[str, list[SourceImage]] = {}
    for split, directory in splits.items():
        if split in corruptions:
            samples[split] = scan_corruption_folder(directory, classes=classes)
        elif split in labels:
            samples[split] = scan_flat_folder(directory, labels=read_label_file(labels[split]), classes=classes)
        else:
            samples[split] = relabel_images(*folder_classes[split], classes)
    return classes, samples


def _choose_classes(
    classes_file: str | Path | None,
    folder_classes: Mapping[str, tuple[list[str], list[SourceImage]]],
    labels: Mapping[str, str | Path],
) -> list[str]:
    if classes_file == IMAGENET:
        return imagenet_classes()
    if classes_file is not None:
        classes = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
        if len(set(classes)) != len(classes):
            raise ValueError(f"{classes_file} lists a class twice")
        return classes
    if folder_classes:
        names = {name for classes, _ in folder_classes.values() for name in classes}
        if all(name.isdigit() for name in names):
            # Folders named by class index (ImageNetV2's 0..999) keep it: folder `10` is class 10, as when read
            # as an ImageFolder for evaluation.
            return [str(i) for i in range(max(int(name) for name in names) + 1)]
        return sorted(names)
    names = {label for split in labels for label in read_label_file(labels[split]).values()}
    if all(name.isdigit() for name in names):
        raise ValueError("the label files hold class indices: pass classes_file (--classes) to name the classes")
    return sorted(names)


def relabel_images(folder_classes: list[str], images: list[SourceImage], classes: Sequence[str]) -> list[SourceImage]:
    """Map a folder's own class indices onto a class list (e.g. ImageNet-R's 200 wnid folders onto the 1000
    ImageNet-1k classes). Folders named by class index (ImageNetV2's `0` ... `999`) keep that index.

    Raises:
        ValueError: a class folder is neither in `classes` nor an index below its length.
    """
    index = {name: i for i, name in enumerate(classes)}
    for name in folder_classes:
        if name not in index and name.isdigit() and int(name) < len(classes):
            index[name] = int(name)
    missing = sorted(set(folder_classes) - set(index))
    if missing:
        raise ValueError(f"class directories {missing[:5]} are neither in the class list nor class indices")
    return [
        SourceImage(
            i.key, index[i.class_name], classes[index[i.class_name]], path=i.path, render=i.render, filename=i.filename
        )
        for i in images
    ]


def _label_index(label: str, index: Mapping[str, int], *, where: str) -> int:
    if label in index:
        return index[label]
    if label.isdigit() and int(label) < len(index):
        return int(label)
    raise ValueError(f"{where}: {label!r} is neither a class name nor an index below {len(index)}")


def _image_files(directory: Path, *, recursive: bool) -> list[Path]:
    if recursive:
        files = [Path(dirpath) / name for dirpath, _, names in os.walk(directory, followlinks=True) for name in names]
    else:
        files = [Path(entry.path) for entry in os.scandir(directory) if entry.is_file()]
    return sorted(path for path in files if path.suffix.lower() in IMAGE_SUFFIXES)


def _make_keys(relative_paths: list[Path], key_style: str) -> list[str]:
    """Sample keys from relative paths. webdataset splits a member name at the first dot of its last path
    component, so dots there become underscores."""
    if key_style not in ("auto", "stem", "path"):
        raise ValueError(f"key_style must be auto, stem or path, got {key_style!r}")

    def clean(parts: tuple[str, ...]) -> str:
        *dirs, name = parts
        return "/".join([*dirs, name.rsplit(".", 1)[0].replace(".", "_")])

    stems = [clean((p.name,)) for p in relative_paths]
    if key_style == "stem" or (key_style == "auto" and len(set(stems)) == len(stems)):
        keys = stems
    else:
        keys = [clean(p.parts) for p in relative_paths]
    seen: dict[str, Path] = {}
    for key, path in zip(keys, relative_paths):
        if key in seen:
            hint = " (use key_style='path')" if key_style == "stem" else ""
            raise ValueError(f"duplicate sample key {key!r}: {seen[key]} and {path}{hint}")
        seen[key] = path
    return keys
