"""Training data and evaluators for the Trainer, from the data and eval sections of the config.

The Trainer needs of its training data what `pace.data`'s loaders offer: `batches_per_epoch` (micro-batches per
epoch on this rank), `set_epoch(epoch, start_batch=...)` and iteration over that epoch from `start_batch`, the same
batches in the same order every time (that is what makes a mid-epoch resume exact).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
from timm.data import Mixup

from pace.data import (
    ShardReading,
    SyntheticTensors,
    TrainSampling,
    create_device_eval_transform,
    create_device_train_transform,
    create_eval_transform,
    create_train_loader,
    create_train_transform,
    make_quickstart_dataset,
)
from pace.distributed import DistEnv, barrier
from pace.eval import EvalData, Evaluator, EvaluatorConfig, build_evaluators
from pace.train.config import AugConfig, DataConfig


class TrainData(Protocol):
    """What the Trainer iterates over (the interface of `pace.data`'s loaders)."""

    @property
    def batches_per_epoch(self) -> int: ...

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]: ...


def build_data(
    cfg: DataConfig,
    aug: AugConfig,
    evaluators: Mapping[str, EvaluatorConfig],
    env: DistEnv,
    seed: int,
    *,
    eval_config: Mapping[str, Any],
    mixup: Mixup | None,
    device: torch.device | None = None,
) -> tuple[TrainData, list[Evaluator], Mixup | None]:
    """The training data and the evaluators (the `eval` group) for this rank.

    Shard loaders apply Mixup/CutMix in their workers under a per-batch seed, which makes it part of the
    deterministic, resumable epoch; synthetic data leaves it to the Trainer.

    Args:
        cfg: the data section of the config.
        aug: the augmentation section of the config.
        evaluators: evaluator name -> entry (the `eval` section of the config).
        env: this process's place in the job.
        seed: base seed shared by all ranks.
        eval_config: the model's resolved data config (`pace.eval.eval_data_config`): its normalisation for the
            training images, and the eval transform its pretrained_cfg records (the run's resolution, crop and
            interpolation), as pace-eval builds it.
        mixup: the batch mixer, if any.
        device: the training device (`data.decode` draft and device finish the batches there).

    Returns:
        The training data, the evaluators, and the mixer the Trainer must still apply (or None).
    """
    if cfg.source == "synthetic":
        eval_transform = create_eval_transform(**eval_config)
        train, held_out = _synthetic_splits(cfg, env, seed)
        return train, open_evaluators(cfg, evaluators, env, eval_transform, synthetic=held_out), mixup
    if cfg.source == "quickstart":
        if env.is_main:
            # Idempotent: returns at once when the dataset is already there.
            make_quickstart_dataset(cfg.root, image_size=cfg.img_size, seed=seed)
        barrier(env)
    train_transform, eval_transform = _shard_transforms(cfg, aug, eval_config=eval_config, device=device)
    train = create_train_loader(
        cfg.root,
        batch_size=cfg.batch_size,
        transform=train_transform,
        env=env,
        sampling=TrainSampling(seed=seed, repeated_aug=aug.repeated_aug),
        reading=ShardReading(num_classes=cfg.num_classes, pin_memory=torch.cuda.is_available()),
        split=cfg.train_split,
        num_workers=cfg.num_workers,
        batch_transform=mixup,
    )
    return train, open_evaluators(cfg, evaluators, env, eval_transform), None


def _synthetic_splits(cfg: DataConfig, env: DistEnv, seed: int) -> tuple[SyntheticTensors, SyntheticTensors]:
    """The synthetic source's training split and its held-out split (with keys, as evaluation needs)."""
    common = {"num_classes": cfg.num_classes, "img_size": cfg.img_size, "env": env, "seed": seed}
    train = SyntheticTensors(num_samples=cfg.synthetic_train_samples, batch_size=cfg.batch_size, split=0, **common)
    held_out = SyntheticTensors(
        num_samples=cfg.synthetic_val_samples, batch_size=cfg.eval_batch_size, split=1, keys=True, **common
    )
    return train, held_out


def _shard_transforms(
    cfg: DataConfig,
    aug: AugConfig,
    *,
    eval_config: Mapping[str, Any],
    device: torch.device | None,
) -> tuple[Callable, Callable]:
    """The train and eval transforms of shard data for `data.decode` (cpu: PIL in the workers; draft, device:
    deferred, finished on the device)."""
    mean, std = eval_config["mean"], eval_config["std"]
    eval_transform = create_eval_transform(**eval_config)
    if cfg.decode == "cpu":
        train_transform = create_train_transform(
            **_train_options(cfg, aug), color_jitter=aug.color_jitter or None, mean=mean, std=std
        )
        return train_transform, eval_transform
    if aug.color_jitter and not aug.auto_augment:
        raise ValueError(f"data.decode={cfg.decode} offers RandAugment, not colour jitter: set aug.color_jitter=0")
    device = device or torch.device("cpu")
    train_transform = create_device_train_transform(
        **_train_options(cfg, aug), mean=mean, std=std, device=device, draft=cfg.decode == "draft"
    )
    if cfg.decode == "device":
        eval_transform = create_device_eval_transform(
            input_size=eval_config["input_size"][-1],
            crop_pct=eval_config["crop_pct"],
            interpolation=eval_config["interpolation"],
            mean=mean,
            std=std,
            device=device,
        )
    return train_transform, eval_transform


def _train_options(cfg: DataConfig, aug: AugConfig) -> dict:
    """The train-transform arguments every `data.decode` mode shares."""
    return {
        "input_size": cfg.img_size,
        "scale": (aug.scale[0], aug.scale[1]),
        "hflip": aug.hflip,
        "auto_augment": aug.auto_augment,
        "interpolation": aug.interpolation,
        "re_prob": aug.reprob,
        "re_mode": aug.remode,
    }


def open_evaluators(
    cfg: DataConfig,
    entries: Mapping[str, EvaluatorConfig],
    env: DistEnv,
    transform: Callable,
    *,
    synthetic: SyntheticTensors | None = None,
) -> list[Evaluator]:
    """Open the evaluators of the `eval` group for this rank (`pace.eval.build_evaluators`).

    Synthetic data has no files: there, the entries that point at the training data (`path` equal to `data.root`)
    score its synthetic held-out split.

    Args:
        cfg: the data section of the config (batch size, workers, root).
        entries: evaluator name -> entry.
        env: this process's place in the job.
        transform: the eval transform.
        synthetic: the synthetic held-out split, when training on synthetic data.
    """
    opened = []
    if synthetic is not None:
        data = EvalData(synthetic, cfg.num_classes, synthetic.num_samples, "synthetic held-out split")
        opened = [Evaluator(name, entry, data) for name, entry in entries.items() if entry.path == cfg.root]
        entries = {name: entry for name, entry in entries.items() if entry.path != cfg.root}
    return opened + build_evaluators(
        entries,
        transform,
        env=env,
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
