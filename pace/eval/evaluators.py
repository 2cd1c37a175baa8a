"""Evaluators declared in config (the `eval` group): each opens its data once and runs `evaluate` on demand, so
pace-eval and the Trainer's periodic evaluation are the same code path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pace.data import ShardReading, create_eval_loader, imagenet_classes, resolve_shards
from pace.distributed import DistEnv
from pace.eval.config import IMAGENET_REAL, TARGETS, EvaluatorConfig
from pace.eval.evaluator import EvalResult, evaluate
from pace.eval.folders import FolderData, corruption_folder, folder_loader, image_folder, imagenet_val_folder
from pace.eval.knn import knn_evaluate
from pace.eval.labels import LabelSets
from pace.eval.robustness import class_subset, score_corruptions

log = logging.getLogger(__name__)


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
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> EvalData:
    """Open the data of one evaluator for this rank.

    Args:
        cfg: the evaluator entry (its `path` must be set).
        transform: the eval transform.
        rank: this process's rank.
        world_size: number of processes.
        batch_size: per-rank batch size.
        num_workers: loader workers per rank.
        pin_memory: pin host memory (for CUDA).
    """
    fmt = detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    classes = label_space(cfg.classes)
    if fmt == "webdataset":
        return _open_shards(cfg, transform, rank, world_size, batch_size, num_workers, pin_memory)
    if fmt == "imagenet_val_folder":
        folder = imagenet_val_folder(cfg.path, cfg.label_file)
    elif fmt == "corruption_folder":
        folder = corruption_folder(cfg.path, classes)
    else:
        folder = image_folder(cfg.path, classes)
    loader = folder_loader(
        folder,
        transform,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
    )
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


def _open_shards(cfg, transform, rank, world_size, batch_size, num_workers, pin_memory) -> EvalData:
    shards = resolve_shards(cfg.path, split=cfg.split, num_samples=cfg.num_samples)
    # Labels are not range-checked by the loader (that would skip them as bad data): the evaluator refuses a
    # label the model cannot predict, naming the sample.
    loader = create_eval_loader(
        cfg.path,
        batch_size=batch_size,
        transform=transform,
        split=cfg.split,
        num_workers=num_workers,
        env=DistEnv(rank=rank, world_size=world_size),
        num_samples=cfg.num_samples,
        reading=ShardReading(pin_memory=pin_memory),
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


def resolve_labels(labels: Mapping[str, str]) -> tuple[str | None, dict[str, LabelSets]]:
    """Split an evaluator's `labels` into the metric group of the samples' own labels and the label sets.

    Args:
        labels: metric group -> `targets`, `imagenet_real` or a JSON file of label sets.
    """
    targets_name, sets = None, {}
    for group, source in labels.items():
        if source == TARGETS:
            targets_name = group
        elif source == IMAGENET_REAL:
            sets[group] = LabelSets.imagenet_real()
        else:
            sets[group] = LabelSets.from_json(source, name=group)
    return targets_name, sets


class Evaluator:
    """One configured evaluator with its data opened for this rank.

    Args:
        name: the entry's name in the `eval` group.
        cfg: the entry.
        data: its opened data.
    """

    def __init__(self, name: str, cfg: EvaluatorConfig, data: EvalData, memory_bank: EvalData | None = None):
        self.name = name
        self.cfg = cfg
        self.data = data
        self.memory_bank = memory_bank
        self.targets_name, self.label_sets = resolve_labels(cfg.labels)
        self.class_subset = class_subset(cfg.class_subset) if cfg.class_subset else None
        if cfg.kind == "knn" and memory_bank is None:
            raise ValueError(f"evaluator {name}: k-NN needs its memory bank (knn_train_path), and this data has none")

    def __repr__(self) -> str:
        return f"Evaluator({self.name!r}, {self.data.description}, labels={dict(self.cfg.labels)})"

    def due(self, epochs_done: int, *, last: bool = False) -> bool:
        """Whether training should run this evaluator after `epochs_done` epochs (always after the last)."""
        return last or epochs_done % self.cfg.every_n_epochs == 0

    def run(
        self,
        model: nn.Module,
        *,
        device,
        amp_dtype=None,
        channels_last: bool = False,
        group=None,
        predictions_path: str | Path | None = None,
        keep_logits: bool = False,
        limit_batches: int | None = None,
        log_every: int = 0,
    ) -> EvalResult:
        """Evaluate `model`; the same on every rank. Arguments as in `pace.eval.evaluate`."""
        if self.cfg.kind == "knn":
            return knn_evaluate(
                model,
                self.memory_bank.loader,
                self.data.loader,
                device=device,
                num_classes=self.data.num_classes or self.memory_bank.num_classes,
                k=self.cfg.knn_k,
                temperature=self.cfg.knn_temperature,
                topk=tuple(self.cfg.topk),
                name=self.targets_name or self.name,
                label_sets=self.label_sets,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
                group=group,
                limit_batches=limit_batches,
                allow_partial=self.cfg.partial,
            )
        corruptions = self.cfg.kind == "corruptions"
        result = evaluate(
            model,
            self.data.loader,
            device=device,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            topk=tuple(self.cfg.topk),
            name=None if corruptions else self.targets_name,
            label_sets={} if corruptions else self.label_sets,
            num_classes=self.data.num_classes,
            expected_samples=self.data.expected_samples,
            allow_partial=self.cfg.partial,
            predictions_path=predictions_path,
            keep_logits=keep_logits,
            group=group,
            limit_batches=limit_batches,
            log_every=log_every,
            class_subset=self.class_subset,
        )
        if corruptions:
            metrics, counts = score_corruptions(
                result.predictions,
                name=self.targets_name or self.name,
                topk=tuple(self.cfg.topk),
                baseline_errors=self.cfg.baseline_errors,
            )
            result.metrics, result.counts = metrics, {**counts, "repeats_dropped": result.counts["repeats_dropped"]}
        return result


def build_evaluators(
    entries: Mapping[str, EvaluatorConfig],
    transform: Callable,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 128,
    num_workers: int = 4,
    pin_memory: bool = False,
) -> list[Evaluator]:
    """Open every evaluator whose data path is set (entries without one are skipped and logged).

    Args:
        entries: evaluator name -> entry (see `pace.eval.config.evaluators_from_config`).
        transform: the eval transform shared by all evaluators.
        rank: this process's rank.
        world_size: number of processes.
        batch_size: per-rank batch size.
        num_workers: loader workers per rank.
        pin_memory: pin host memory (for CUDA).
    """
    evaluators = []
    for name, cfg in entries.items():
        if not cfg.path:
            log.info("evaluator %s: no data path, skipped", name)
            continue
        options = {
            "rank": rank,
            "world_size": world_size,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "pin_memory": pin_memory,
        }
        data = open_eval_data(cfg, transform, **options)
        bank = None
        if cfg.kind == "knn":
            bank_cfg = dataclasses.replace(
                cfg, path=cfg.knn_train_path, split=cfg.knn_train_split, num_samples=None, label_file=None
            )
            bank = open_eval_data(bank_cfg, transform, **options)
        evaluators.append(Evaluator(name, cfg, data, bank))
    return evaluators
