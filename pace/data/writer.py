"""Shard writer: image folders (or generated images) -> webdataset tar shards plus `_info.json`.

Each sample is stored as `<key>.cls` (class index, ASCII), `<key>.<jpg|png|webp>` (the encoded image as stored,
unless resizing or re-encoding is asked for) and `<key>.json` (original file name, class name, sizes). Shards
are planned before anything is written, so their contents do not depend on the number of worker processes.
Everything is written into a staging directory beside the output and published when every split is done (see
`_publish`), so a failed or killed run never leaves part of a dataset in the output, and a rerun starts clean.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from webdataset import TarWriter

from pace.data.imagenet import imagenet_classes, read_label_file
from pace.data.info import INFO_FORMAT, INFO_NAME, read_info, write_info
from pace.data.jpeg_check import jpeg_damage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # anything else is re-encoded as JPEG
_TAR_OVERHEAD = 3 * 1024  # per sample: three member headers and padding
_MTIME = 0  # fixed member times: the same input gives byte-identical shards


class BadImageError(ValueError):
    """An image file cannot be read or decoded; the message names it."""


@dataclass(frozen=True)
class SourceImage:
    """One image to write.

    Args:
        key: the sample key (`__key__`), unique within the split.
        label: class index.
        class_name: class name (wnid).
        path: image file, stored as is; or None with `render`.
        render: zero-argument picklable callable returning encoded image bytes (generated data).
        filename: original file name recorded in the sample's JSON.
    """

    key: str
    label: int
    class_name: str
    path: str | None = None
    render: Callable[[], bytes] | None = None
    filename: str = ""


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored.

    Args:
        max_side: resize images whose longer side exceeds this (re-encoded as JPEG); None: keep sizes.
        max_short_side: resize images whose shorter side exceeds this (re-encoded as JPEG; FFCV-style pre-resized
            shards that decode faster); None: keep sizes. With both, the smaller resulting size wins.
        quality: JPEG quality of re-encoded images.
        reencode: re-encode every image as JPEG at `quality`.
        verify: fully decode each image while writing, and check a JPEG's markers through to its end-of-image
            marker, so damaged files fail here rather than in training.
    """

    max_side: int | None = None
    max_short_side: int | None = None
    quality: int = 90
    reencode: bool = False
    verify: bool = True


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
    prefix: str | None = None,
    key_style: str = "auto",
    max_count: int = 1000,
    max_size: int | None = None,
    options: EncodeOptions | None = None,
    workers: int = 1,
    shuffle_splits: Sequence[str] = ("train",),
    seed: int = 0,
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
        prefix: shard name prefix (`<prefix>-<split>-NNNNNN.tar`); default: the output directory's name.
        key_style: see `scan_image_folder`.
        max_count: samples per shard at most.
        max_size: bytes per shard at most (estimated from the source files); None: no limit.
        options: how images are stored.
        workers: writer processes.
        shuffle_splits: splits whose sample order is shuffled (training shards should mix classes).
        seed: seed of that shuffle.
        overwrite: write into a non-empty directory, replacing the shards of the splits written now.

    Returns:
        The info dict written to `<out_dir>/_info.json`.
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
    return write_dataset(
        out_dir,
        samples,
        classes=classes,
        prefix=prefix,
        max_count=max_count,
        max_size=max_size,
        options=options,
        workers=workers,
        shuffle_splits=shuffle_splits,
        seed=seed,
        overwrite=overwrite,
        sources={split: str(directory) for split, directory in splits.items()},
    )


def write_dataset(
    out_dir: str | Path,
    splits: Mapping[str, Sequence[SourceImage]],
    *,
    classes: Sequence[str],
    prefix: str | None = None,
    max_count: int = 1000,
    max_size: int | None = None,
    options: EncodeOptions | None = None,
    workers: int = 1,
    shuffle_splits: Sequence[str] = ("train",),
    seed: int = 0,
    overwrite: bool = False,
    sources: Mapping[str, str] | None = None,
    extra_info: Mapping | None = None,
) -> dict:
    """Write listed images as shards, one shard set per split, then the info file.

    Args:
        out_dir: output directory (created; must be empty unless overwrite).
        splits: split name -> images.
        classes: class names in index order.
        prefix: shard name prefix; default: the output directory's name.
        max_count: samples per shard at most.
        max_size: bytes per shard at most (estimated); None: no limit.
        options: how images are stored.
        workers: writer processes.
        shuffle_splits: splits whose order is shuffled before sharding.
        seed: seed of that shuffle.
        overwrite: write into a non-empty directory, replacing the shards of the splits written now.
        sources: split name -> where its images came from (recorded in the info file).
        extra_info: more top-level entries for the info file.

    Returns:
        The info dict written to `<out_dir>/_info.json`.
    """
    out_dir = Path(out_dir)
    prefix = prefix or out_dir.resolve().name
    options = options or EncodeOptions()
    if max_count < 1 or (max_size is not None and max_size < 1):
        raise ValueError(f"max_count ({max_count}) and max_size ({max_size}) must be positive")
    info = _prepare_output(out_dir, prefix, list(splits), classes, overwrite)
    info.update(extra_info or {})
    kept = dict(info["splits"])  # the splits of an existing directory that are not rewritten
    staging = _staging_directory(out_dir)
    try:
        for split, images in splits.items():
            images = list(images)
            if split in shuffle_splits:
                random.Random(seed).shuffle(images)
            entry = _write_split(staging, prefix, split, images, max_count, max_size, options, workers)
            entry["source"] = (sources or {}).get(split, "")
            info["splits"][split] = entry
            logger.info("%s: %d samples in %d shards", split, entry["num_samples"], len(entry["filenames"]))
        _publish(staging, out_dir, info, kept, prefix)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed run leaves nothing behind (SIGKILL: the next run)
        raise
    return info


def _staging_directory(out_dir: Path) -> Path:
    """A fresh directory beside the output (same file system, so its contents move in by rename)."""
    out = out_dir.resolve()
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        logger.info("removing %s, the unfinished output of an earlier run", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, out_dir: Path, info: dict, kept: dict, prefix: str) -> None:
    """Move the finished shards and info file from the staging directory into the output.

    A new or empty output directory is replaced by the staging directory in one rename. Into a non-empty one
    (overwrite), the info file is first cut down to the splits kept, the rewritten splits' old shards are
    deleted, the new ones moved in, and the full info file written last: at every point, the info file lists
    complete shards only.
    """
    if not out_dir.exists() or not any(out_dir.iterdir()):
        write_info(staging, info)
        os.replace(staging, out_dir)
        return
    write_info(out_dir, {**info, "splits": kept})
    for split in info["splits"].keys() - kept.keys():
        for path in out_dir.glob(f"{prefix}-{split}-*.tar*"):
            path.unlink()
    for path in out_dir.glob("*.tmp"):
        path.unlink() if path.is_file() else shutil.rmtree(path)
    for path in sorted(staging.iterdir()):
        os.replace(path, out_dir / path.name)
    write_info(out_dir, info)
    staging.rmdir()


def _write_split(
    out_dir: Path,
    prefix: str,
    split: str,
    images: list[SourceImage],
    max_count: int,
    max_size: int | None,
    options: EncodeOptions,
    workers: int,
) -> dict:
    if not images:
        raise ValueError(f"split {split} has no images")
    jobs = [
        (str(out_dir / f"{prefix}-{split}-{i:06d}.tar"), chunk, options)
        for i, chunk in enumerate(_plan_shards(images, max_count, max_size))
    ]
    if workers <= 1:
        results = [_write_shard(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_write_shard, *job) for job in jobs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                pool.shutdown(cancel_futures=True)
                raise failed[0].exception()
            results = [f.result() for f in futures]
    sizes = [r["sizes"] for r in results]
    count = sum(r["count"] for r in results)
    return {
        "name": split,
        "num_samples": count,
        "filenames": [Path(r["path"]).name for r in results],
        "shard_lengths": [r["count"] for r in results],
        "pattern": f"{prefix}-{split}-{{000000..{len(results) - 1:06d}}}.tar",
        "bytes": sum(r["bytes"] for r in results),
        "image_size": {
            "min": [min(s["min"][0] for s in sizes), min(s["min"][1] for s in sizes)],
            "max": [max(s["max"][0] for s in sizes), max(s["max"][1] for s in sizes)],
            "mean": [round(sum(s["sum"][d] for s in sizes) / count, 1) for d in (0, 1)],
        },
        "stored": {
            **({"max_short_side": options.max_short_side} if options.max_short_side else {}),
            "max_side": options.max_side,
            "quality": options.quality,
            "reencode": options.reencode,
        },
    }


def _plan_shards(images: list[SourceImage], max_count: int, max_size: int | None) -> list[list[SourceImage]]:
    """Cut the sample list into shards by count and (estimated) size, independently of the writer processes."""
    chunks: list[list[SourceImage]] = [[]]
    size = 0
    for image in images:
        estimate = (os.path.getsize(image.path) if image.path and max_size else 0) + _TAR_OVERHEAD
        if chunks[-1] and (len(chunks[-1]) >= max_count or (max_size and size + estimate > max_size)):
            chunks.append([])
            size = 0
        chunks[-1].append(image)
        size += estimate
    return chunks


def _write_shard(path: str, images: list[SourceImage], options: EncodeOptions) -> dict:
    """Write one shard under a temporary name, then rename it (runs in a writer process)."""
    tmp = path + ".tmp"
    sizes = {"min": [1 << 30, 1 << 30], "max": [0, 0], "sum": [0, 0]}
    try:
        with open(tmp, "wb") as stream, TarWriter(stream, encoder=False, mtime=_MTIME) as writer:
            for image in images:
                suffix, data, meta = _encode(image, options)
                writer.write(
                    {
                        "__key__": image.key,
                        "cls": str(image.label).encode(),
                        suffix: data,
                        "json": _json_bytes(
                            {"filename": image.filename, "label": image.label, "class_name": image.class_name, **meta}
                        ),
                    }
                )
                for d, side in enumerate((meta["width"], meta["height"])):
                    sizes["min"][d], sizes["max"][d] = min(sizes["min"][d], side), max(sizes["max"][d], side)
                    sizes["sum"][d] += side
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"path": path, "count": len(images), "bytes": os.path.getsize(path), "sizes": sizes}


def _encode(image: SourceImage, options: EncodeOptions) -> tuple[str, bytes, dict]:
    """The member suffix, the bytes to store, and size metadata for one image."""
    where = image.path or f"generated sample {image.key}"
    try:
        data = Path(image.path).read_bytes() if image.path else image.render()
        decoded = Image.open(io.BytesIO(data))
        width, height = decoded.size
        fmt = decoded.format
        if options.verify:
            decoded.load()
    except Exception as exn:  # PIL raises many types for damaged files
        raise BadImageError(f"cannot read image {where}: {exn!r}") from exn
    damage = jpeg_damage(data) if options.verify and fmt == "JPEG" else None
    if damage:  # decoded without error, but its end is missing (see pace.data.jpeg_check)
        raise BadImageError(f"cannot read image {where}: damaged JPEG ({damage})")
    meta = {"width": width, "height": height}
    scale = min(
        options.max_side / max(width, height) if options.max_side else 1.0,
        options.max_short_side / min(width, height) if options.max_short_side else 1.0,
    )
    too_big = scale < 1.0
    if not (too_big or options.reencode or fmt not in _STORED_FORMATS):
        return _STORED_FORMATS[fmt], data, meta
    decoded = decoded.convert("RGB")
    if too_big:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        decoded = decoded.resize(size, Image.Resampling.LANCZOS)
        meta = {"width": size[0], "height": size[1], "orig_width": width, "orig_height": height}
    out = io.BytesIO()
    decoded.save(out, format="JPEG", quality=options.quality)
    return "jpg", out.getvalue(), meta


def _prepare_output(out_dir: Path, prefix: str, splits: list[str], classes: Sequence[str], overwrite: bool) -> dict:
    """The info dict to write, holding the splits of an existing output that are kept; refuses a non-empty
    directory unless overwrite. Nothing is written here: the output changes only when every split is done."""
    info = {"format": INFO_FORMAT, "version": 1, "name": prefix, "classes": list(classes), "splits": {}}
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a directory")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    if not entries:
        return info
    if not overwrite:
        raise FileExistsError(
            f"output directory {out_dir} is not empty ({len(entries)} entries, e.g. {entries[0]}); "
            "pass overwrite=True (--overwrite) to replace the splits written now"
        )
    existing = read_info(out_dir) if (out_dir / INFO_NAME).exists() else None
    if existing is not None and existing.get("classes") and list(existing["classes"]) != list(classes):
        raise ValueError(f"{out_dir / INFO_NAME} has another class list; write these splits into an empty directory")
    if existing is not None:
        info["splits"] = {name: entry for name, entry in existing["splits"].items() if name not in splits}
    return info


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


def _json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode()
