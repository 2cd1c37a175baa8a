"""Training data and evaluators for the Trainer, from the data and eval sections of the config.

The Trainer needs of its training data what `pace.data`'s loaders offer: `batches_per_epoch` (micro-batches per
epoch on this rank), `set_epoch(epoch, start_batch=...)` and iteration over that epoch from `start_batch`, the same
batches in the same order every time (that is what makes a mid-epoch resume exact).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from timm.data import Mixup

from pace.data import (
    create_device_eval_transform,
    create_device_train_transform,
    create_eval_transform,
    create_train_loader,
    create_train_transform,
    make_synthetic_dataset,
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


class SyntheticImages:
    """Class-conditional random images, reproducible from (seed, split, epoch, rank, batch index).

    Each class is a smooth random colour pattern; samples add noise to it, so a model can learn the classes
    (smoke tests see the loss fall) while no file is read (throughput runs measure compute alone).

    Args:
        num_samples: images in the split over all ranks (each rank takes `num_samples // world_size`).
        num_classes: classes.
        img_size: square image side.
        batch_size: images per batch on this rank.
        env: this process's place in the job.
        seed: base seed (the class patterns depend on it alone, so every split shares them).
        split: salt that separates the training and held-out draws.
        noise: standard deviation of the per-sample noise.
        keys: also yield each sample's key (`synthetic/<split>/<epoch>/<rank>/<batch>/<i>`), as evaluation needs.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        num_classes: int,
        img_size: int,
        batch_size: int,
        env: DistEnv,
        seed: int = 0,
        split: int = 0,
        noise: float = 1.0,
        keys: bool = False,
    ) -> None:
        self.num_classes = num_classes
        self.img_size = img_size
        self.batch_size = batch_size
        self.rank = env.rank
        self.world_size = env.world_size
        self.seed = seed
        self.split = split
        self.noise = noise
        self.keys = keys
        self.epoch, self.start_batch = 0, 0
        self.num_batches = num_samples // env.world_size // batch_size
        if self.num_batches == 0:
            raise ValueError(f"synthetic split of {num_samples} samples gives rank {env.rank} no batch of {batch_size}")
        generator = torch.Generator().manual_seed(batch_seed(seed))  # any int: a config seed is unbounded
        coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
        self.patterns = F.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Choose the epoch the next iteration yields and the batch it starts at.

        Args:
            epoch: epoch index (changes the draw).
            start_batch: first batch to yield.
        """
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def _batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(batch_seed(self.seed, self.split, self.epoch, self.rank, index))
        targets = torch.randint(self.num_classes, (self.batch_size,), generator=generator)
        noise = torch.randn(self.batch_size, 3, self.img_size, self.img_size, generator=generator)
        return self.patterns[targets] + self.noise * noise, targets  # (B, 3, H, W), (B,)

    @property
    def num_samples(self) -> int:
        """Samples of one epoch over all ranks."""
        return self.num_batches * self.batch_size * self.world_size

    def __iter__(self) -> Iterator[tuple]:
        for index in range(self.start_batch, self.num_batches):
            images, targets = self._batch(index)
            if not self.keys:
                yield images, targets
                continue
            prefix = f"synthetic/{self.split}/{self.epoch}/{self.rank}/{index}"
            yield images, targets, [f"{prefix}/{i}" for i in range(len(targets))]


def batch_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers of any size and sign (a plain product overflows torch's int64 seed).

    Args:
        parts: the integers that identify the batch (seed, split, epoch, rank, batch index).

    Returns:
        A seed in [0, 2**63), the same on every platform and Python version.
    """
    digest = hashlib.blake2b(b",".join(b"%d" % p for p in parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
    mean, std = eval_config["mean"], eval_config["std"]
    eval_transform = create_eval_transform(**eval_config)
    if cfg.source == "synthetic":
        common = {"num_classes": cfg.num_classes, "img_size": cfg.img_size, "env": env, "seed": seed}
        train = SyntheticImages(num_samples=cfg.synthetic_train_samples, batch_size=cfg.batch_size, split=0, **common)
        held_out = SyntheticImages(
            num_samples=cfg.synthetic_val_samples, batch_size=cfg.eval_batch_size, split=1, keys=True, **common
        )
        return train, open_evaluators(cfg, evaluators, env, eval_transform, synthetic=held_out), mixup
    if cfg.source == "quickstart":
        if env.is_main:
            # Idempotent: returns at once when the dataset is already there.
            make_synthetic_dataset(cfg.root, image_size=cfg.img_size, seed=seed)
        barrier(env)
    if cfg.decode != "cpu":
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
    else:
        train_transform = create_train_transform(**_train_options(cfg, aug), color_jitter=aug.color_jitter or None)
    train = create_train_loader(
        cfg.root,
        batch_size=cfg.batch_size,
        transform=train_transform,
        split=cfg.train_split,
        num_workers=cfg.num_workers,
        seed=seed,
        repeated_aug=aug.repeated_aug,
        batch_transform=mixup,
        pin_memory=torch.cuda.is_available(),
        rank=env.rank,
        world_size=env.world_size,
        num_classes=cfg.num_classes,
    )
    return train, open_evaluators(cfg, evaluators, env, eval_transform), None


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
    synthetic: SyntheticImages | None = None,
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
