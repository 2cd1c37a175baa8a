"""Shard writer: listed images (from image folders or generated) -> webdataset tar shards plus `_info.json`.

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

from PIL import Image, UnidentifiedImageError
from webdataset import TarWriter

from pace.data.info import INFO_FORMAT, INFO_NAME, read_info, write_info
from pace.data.jpeg_check import jpeg_damage

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ShardPlan:
    """How each split's samples are ordered, cut into shards and named.

    Args:
        prefix: shard name prefix (`<prefix>-<split>-NNNNNN.tar`); default: the output directory's name.
        max_count: samples per shard at most.
        max_size: bytes per shard at most (estimated from the source files); None: no limit.
        shuffle_splits: splits whose sample order is shuffled before sharding (training shards should mix classes).
        seed: seed of that shuffle.
    """

    prefix: str | None = None
    max_count: int = 1000
    max_size: int | None = None
    shuffle_splits: Sequence[str] = ("train",)
    seed: int = 0


def write_dataset(
    out_dir: str | Path,
    splits: Mapping[str, Sequence[SourceImage]],
    *,
    classes: Sequence[str],
    plan: ShardPlan | None = None,
    options: EncodeOptions | None = None,
    workers: int = 1,
    overwrite: bool = False,
    sources: Mapping[str, str] | None = None,
    extra_info: Mapping | None = None,
) -> dict:
    """Write listed images as shards, one shard set per split, then the info file.

    Args:
        out_dir: output directory (created; must be empty unless overwrite).
        splits: split name -> images.
        classes: class names in index order.
        plan: how the samples are ordered, cut into shards and named (default: `ShardPlan()`).
        options: how images are stored.
        workers: writer processes.
        overwrite: write into a non-empty directory, replacing the shards of the splits written now.
        sources: split name -> where its images came from (recorded in the info file).
        extra_info: more top-level entries for the info file.

    Returns:
        The info dict written to `<out_dir>/_info.json`.
    """
    plan = plan or ShardPlan()
    max_count, max_size = plan.max_count, plan.max_size
    out_dir = Path(out_dir)
    prefix = plan.prefix or out_dir.resolve().name
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
            if split in plan.shuffle_splits:
                random.Random(plan.seed).shuffle(images)
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
    except UnidentifiedImageError as exn:  # its message names the in-memory buffer, not the file
        raise BadImageError(f"cannot read image {where}: not an image format Pillow reads") from exn
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


def _json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode()
