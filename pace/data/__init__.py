"""Webdataset shards: writer, streaming pipeline, transforms, the generated quickstart dataset and the synthetic
(random tensor) source.

Training loaders yield `(images, targets)`, evaluation loaders `(images, targets, keys)`; see docs/data.md.
"""

from pace.data.device_augment import create_device_eval_transform, create_device_train_transform
from pace.data.image_folders import shard_image_folders
from pace.data.imagenet import IMAGENET1K_WDS, imagenet_classes, read_label_file, val_key_index
from pace.data.info import ShardSet, read_info, resolve_shards
from pace.data.loader import (
    EpochStats,
    ShardLoader,
    ShardReading,
    TooMuchBadDataError,
    TrainSampling,
    create_eval_loader,
    create_train_loader,
)
from pace.data.quickstart import QUICKSTART_CLASSES, make_quickstart_dataset
from pace.data.shards import BadData, ShardOpenError
from pace.data.synthetic_tensors import SyntheticTensors
from pace.data.transforms import create_eval_transform, create_mixup, create_train_transform
from pace.data.writer import EncodeOptions, ShardPlan, SourceImage, write_dataset

__all__ = [
    "IMAGENET1K_WDS",
    "QUICKSTART_CLASSES",
    "BadData",
    "TooMuchBadDataError",
    "TrainSampling",
    "EncodeOptions",
    "EpochStats",
    "ShardLoader",
    "ShardOpenError",
    "ShardPlan",
    "ShardReading",
    "ShardSet",
    "SourceImage",
    "SyntheticTensors",
    "create_device_eval_transform",
    "create_device_train_transform",
    "create_eval_loader",
    "create_eval_transform",
    "create_mixup",
    "create_train_loader",
    "create_train_transform",
    "imagenet_classes",
    "shard_image_folders",
    "make_quickstart_dataset",
    "read_info",
    "read_label_file",
    "resolve_shards",
    "val_key_index",
    "write_dataset",
]
