"""The data of an evaluator entry, opened for this rank: webdataset shards, a flat ImageNet val folder, an
ImageFolder tree or an ImageNet-C tree, with what the data declares about itself (classes, sample count).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pace.data import ShardReading, create_eval_loader, imagenet_classes, resolve_shards
from pace.distributed import DistEnv
from pace.eval.config import EvaluatorConfig
from pace.eval.folders import FolderData, corruption_folder, folder_loader, image_folder, imagenet_val_folder


@dataclass
class EvalData:
    """An opened evaluation dataset: this rank's loader and what the data declares about itself.

    Args:
        loader: yields `(images, targets, keys)` for this rank's share.
        num_classes: classes of the label space, when known.
        expected_samples: samples the data declares (info or label file), when known.
        description: one line for reports.
    """

    loader: Iterable
    num_classes: int | None
    expected_samples: int | None
    description: str


def detect_format(path: str) -> str:
    """`webdataset`, `imagenet_val_folder` or `image_folder`, from what is at `path`.

    A folder of `.tar` shards (or with an `_info.json`), or anything that is not a local folder (brace pattern,
    URL, list file), is webdataset; a folder holding `ILSVRC2012_val_*` images directly is a flat val folder; a
    folder of sub-folders whose sub-folders are named by number (`gaussian_noise/1/`) is an ImageNet-C tree; any
    other folder of sub-folders is an ImageFolder tree.
    """
    folder = Path(path)
    if not folder.is_dir():
        return "webdataset"
    names = [p.name for p in folder.iterdir()]
    if "_info.json" in names or any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.startswith("ILSVRC2012_val_") for n in names):
        return "imagenet_val_folder"
    subdirs = [folder / n for n in names if (folder / n).is_dir()]
    if subdirs:
        inner = [p for p in subdirs[0].iterdir() if p.is_dir()]
        if inner and all(p.name.isdigit() for p in inner):
            return "corruption_folder"
        return "image_folder"
    raise ValueError(f"{path}: cannot tell the data format (no shards, no ILSVRC2012_val_* files, no class folders)")


def open_eval_data(
    cfg: EvaluatorConfig,
    transform: Callable,
    *,
    env: DistEnv,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> EvalData:
    """Open the data of one evaluator for this rank.

    Args:
        cfg: the evaluator entry (its `path` must be set).
        transform: the eval transform.
        env: this process's place in the job (which share of the samples it loads).
        batch_size: per-rank batch size.
        num_workers: loader workers per rank.
        pin_memory: pin host memory (for CUDA).
    """
    fmt = detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    classes = label_space(cfg.classes)
    loading = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "env": env,
        "pin_memory": pin_memory,
    }
    if fmt == "webdataset":
        return _open_shards(cfg, transform, loading)
    if fmt == "imagenet_val_folder":
        folder = imagenet_val_folder(cfg.path, cfg.label_file)
    elif fmt == "corruption_folder":
        folder = corruption_folder(cfg.path, classes)
    else:
        folder = image_folder(cfg.path, classes)
    loader = folder_loader(folder, transform, **loading)
    return EvalData(loader, folder.num_classes, _declared(cfg, folder), folder.description)


def label_space(spec: str | None) -> list[str] | None:
    """The class names of an evaluator's `classes` setting, in index order.

    Args:
        spec: `imagenet` (timm's 1000 wnids), a shard folder's `_info.json` (its `classes`), a text file with one
            class name per line, or None (the data's own classes).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file names no classes.
    """
    if spec is None:
        return None
    if spec == "imagenet":
        return imagenet_classes()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"classes={spec!r}: neither 'imagenet' nor a class-list file")
    if path.suffix == ".json":
        classes = list(json.loads(path.read_text()).get("classes") or [])
    else:
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not classes:
        raise ValueError(f"classes={spec!r}: the file names no classes")
    return classes


def _declared(cfg: EvaluatorConfig, folder: FolderData) -> int | None:
    return cfg.num_samples if cfg.num_samples is not None else folder.expected_samples


def _open_shards(cfg: EvaluatorConfig, transform: Callable, loading: dict) -> EvalData:
    shards = resolve_shards(cfg.path, split=cfg.split, num_samples=cfg.num_samples)
    # Labels are not range-checked by the loader (that would skip them as bad data): the evaluator refuses a
    # label the model cannot predict, naming the sample.
    loader = create_eval_loader(
        cfg.path,
        transform=transform,
        split=cfg.split,
        num_samples=cfg.num_samples,
        batch_size=loading["batch_size"],
        num_workers=loading["num_workers"],
        env=loading["env"],
        reading=ShardReading(pin_memory=loading["pin_memory"]),
    )
    num_classes = len(shards.classes) if shards.classes else None
    wanted = label_space(cfg.classes)
    if wanted is not None and shards.classes and list(shards.classes) != wanted:
        raise ValueError(
            f"{cfg.path}: classes={cfg.classes}, but the shards' class list is another one ({len(shards.classes)} "
            "classes); write them with pace-make-shards --classes (imagenet or the class-list file)"
        )
    where = shards.info_path or f"{len(shards.urls)} shards"
    return EvalData(loader, num_classes, shards.num_samples, f"webdataset {cfg.path} split {cfg.split} ({where})")
