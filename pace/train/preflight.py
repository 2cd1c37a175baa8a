"""Checks of the data against the config that run before the first training step, from metadata alone.

Without them a class count that does not match the data, or ImageNet-ReaL asked for on data that is not
ImageNet val, fails after a whole epoch or a whole evaluation pass.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Mapping
from pathlib import Path

from pace.data import resolve_shards
from pace.data.imagenet import val_key_index
from pace.errors import UsageError
from pace.eval.config import IMAGENET_REAL, EvaluatorConfig
from pace.train.config import DataConfig

log = logging.getLogger(__name__)


def check_class_count(data: DataConfig, num_classes: int) -> None:
    """The training split's class list (from its `_info.json`) must have `num_classes` entries.

    Args:
        data: the data section (shard data only; synthetic data has no info file).
        num_classes: the model head's width (`model.num_classes`).

    Raises:
        UsageError: naming the info file, its class count and the config keys.
    """
    if data.source == "synthetic":
        return
    shards = resolve_shards(data.root, split=data.train_split)
    if shards.classes is None:
        log.info("%s declares no class list; the class count is checked on the labels as they are read", data.root)
        return
    if len(shards.classes) != num_classes:
        raise UsageError(
            f"{shards.info_path} lists {len(shards.classes)} classes, but model.num_classes={num_classes} "
            f"(data.num_classes={data.num_classes}): set data.num_classes={len(shards.classes)}"
        )


def _first_key(shard: str) -> str | None:
    # A tar member is named `<key>.<ext>`; the first header is all that is read.
    path = Path(shard.removeprefix("file:"))
    if not path.is_file():
        return None  # remote shards are checked when the evaluator reads them
    with tarfile.open(path) as tar:
        member = tar.next()
    return None if member is None else Path(member.name).name.split(".", 1)[0]


def check_imagenet_keys(entries: Mapping[str, EvaluatorConfig]) -> None:
    """ImageNet-ReaL labels are matched by ImageNet val file key: the data must carry such keys.

    Args:
        entries: the `eval` group's evaluators.

    Raises:
        UsageError: an evaluator with `imagenet_real` labels reads shards whose keys are not ImageNet val keys.
    """
    for name, entry in entries.items():
        if IMAGENET_REAL not in entry.labels.values() or not entry.path or entry.format not in ("auto", "webdataset"):
            continue
        if entry.format == "auto" and Path(entry.path).is_dir() and not any(Path(entry.path).glob("*.tar")):
            continue  # a flat JPEG folder or ImageFolder tree: its reader checks the file names
        shards = resolve_shards(entry.path, split=entry.split)
        key = _first_key(shards.urls[0]) if shards.urls else None
        if key is None:
            continue
        try:
            val_key_index(key)
        except ValueError:
            raise UsageError(
                f"eval.{name} scores ImageNet-ReaL labels, which are matched by ImageNet val keys "
                f"(ILSVRC2012_val_00000001), but {shards.urls[0]} holds keys like {key!r}: use eval=default for "
                f"data other than ImageNet val"
            ) from None
