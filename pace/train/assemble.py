"""Assemble a Trainer from the validated config: the order matters for DDP and exact resume."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from timm.utils import random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pace.distributed import DistEnv, all_gather_object, capped_workers
from pace.errors import RunError
from pace.eval.transform import eval_data_config, run_eval_settings, set_eval_settings
from pace.models import compile_blocks
from pace.train.builders import (
    build_ema,
    build_loss,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    model_args,
)
from pace.train.checkpoint import CheckpointManager
from pace.train.config import DataConfig, TrainConfig, TrainerConfig
from pace.train.data_builders import build_data
from pace.train.distill import build_distillation, enable_distilled_training
from pace.train.flops import training_flops_per_image
from pace.train.metric_logger import MetricLogger
from pace.train.preflight import check_class_count, check_imagenet_keys
from pace.train.provenance import git_sha, write_provenance
from pace.train.run_identity import config_hash, select_checkpoint
from pace.train.throughput import ThroughputMeter, device_peak_tflops
from pace.train.trainer import Trainer, updates_per_epoch

log = logging.getLogger(__name__)


def agreed_run_dir(run_dir: str, env: DistEnv) -> Path:
    """The run dir, checked to be the same on every rank.

    Each torchrun rank composes its own Hydra config, so a run dir with `${now:...}` in it would differ.

    Args:
        run_dir: this rank's run dir.
        env: this process's place in the job.
    """
    path = Path(run_dir).resolve()
    dirs = sorted(set(all_gather_object(str(path), env)))
    if len(dirs) > 1:
        raise RunError(f"ranks disagree on the run dir {dirs}: pass one hydra.run.dir=... to every rank")
    return path


def _prepare_model(cfg: TrainConfig, env: DistEnv, device: torch.device) -> nn.Module:
    # The same seed on every rank: identical initial weights even before DDP's broadcast.
    random_seed(cfg.seed)
    model = build_model(cfg.model)
    set_eval_settings(model, run_eval_settings(cfg.data.img_size, cfg.aug.crop_pct, cfg.aug.interpolation))
    if env.is_distributed and cfg.trainer.sync_batchnorm:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            # SyncBatchNorm has no CPU kernel; DDP still broadcasts rank 0's BatchNorm buffers every step.
            log.info("trainer.sync_batchnorm: kept per-rank BatchNorm statistics on %s", device.type)
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_trainer(cfg: TrainConfig, *, env: DistEnv, device: torch.device, resolved: dict[str, Any]) -> Trainer:
    """Build every component and hand them to a Trainer.

    Args:
        cfg: the validated config.
        env: this process's place in the job.
        device: this rank's device.
        resolved: the resolved config as plain containers (recorded in the run dir and in checkpoints).
    """
    run_dir = agreed_run_dir(cfg.run_dir, env)
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.trainer.keep_last, cfg.trainer.keep_best)
    # Every rank reads the same files and reaches the same decision (or raises the same error).
    resume_from = select_checkpoint(checkpoints, cfg.trainer.resume, resolved, set_aside=env.is_main)
    check_imagenet_keys(cfg.eval)
    sha = git_sha()
    _cap_workers(cfg.data, env)
    model = _prepare_model(cfg, env, device)
    enable_distilled_training(model, cfg.distill)
    global_batch = cfg.data.batch_size * cfg.trainer.grad_accum_steps * env.world_size
    optimizer = build_optimizer(model, cfg.optim, global_batch)
    train_model = _wrap_for_training(model, env, device, cfg.trainer)
    # After DDP's broadcast, so every rank's EMA starts from rank 0's weights.
    ema = build_ema(model, cfg.trainer.ema_decay, cfg.trainer.ema_warmup) if cfg.trainer.ema else None
    mixup = build_mixup(cfg.aug, cfg.model.num_classes)
    # The transform pace-eval would build for this model: its pretrained_cfg records the run's eval settings.
    norm = eval_data_config(model)
    train_data, evaluators, step_mixup = build_data(
        cfg.data, cfg.aug, cfg.eval, env, cfg.seed, eval_config=norm, mixup=mixup, device=device
    )
    check_class_count(cfg.data, cfg.model.num_classes)  # after build_data: the quickstart data exists now
    scheduler = build_scheduler(optimizer, cfg.sched, updates_per_epoch(train_data.batches_per_epoch, cfg.trainer))
    meter = _throughput_meter(model, cfg, device)
    loss_fn = build_loss(cfg.aug, mixing=mixup is not None)
    distill = build_distillation(
        cfg.distill, loss_fn, num_classes=cfg.model.num_classes, mean=norm["mean"], std=norm["std"], device=device
    )
    # Each rank draws its own dropout / drop-path / Mixup randomness from here on.
    random_seed(cfg.seed, env.rank)
    if env.is_main:
        write_provenance(run_dir, resolved, env, sha)
    return Trainer(
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        train_data=train_data,
        evaluators=evaluators,
        checkpoints=checkpoints,
        metrics=MetricLogger(run_dir, env, cfg.logger, {**resolved, "git_sha": sha}, cfg.name),
        env=env,
        device=device,
        options=cfg.trainer,
        epochs=cfg.sched.epochs,
        run_dir=run_dir,
        checkpoint_meta=_checkpoint_meta(cfg, resolved, sha),
        mixup=step_mixup,
        ema=ema,
        clip_grad=cfg.optim.clip_grad,
        clip_mode=cfg.optim.clip_mode,
        meter=meter,
        resume_from=resume_from,
        distill=distill,
    )


def _cap_workers(cfg: DataConfig, env: DistEnv) -> None:
    # More loader workers than the CPUs this process may use only slows every one of them down.
    workers = capped_workers(cfg.num_workers, env)
    if workers < cfg.num_workers:
        log.info("data.num_workers=%d capped at %d: the CPUs this process may use", cfg.num_workers, workers)
        cfg.num_workers = workers


def _wrap_for_training(model: nn.Module, env: DistEnv, device: torch.device, trainer: TrainerConfig) -> nn.Module:
    """The module the forward pass runs through: `model` under DDP when distributed, compiled if asked.

    Blocks are compiled in place before DDP wraps the model (the module tree and the state-dict keys stay as they
    are); the whole model is compiled around DDP, as torch recommends.
    """
    mode = trainer.compile_mode
    if trainer.compile and trainer.compile_scope == "blocks":
        compile_blocks(model, mode=mode)
    train_model: nn.Module = model
    if env.is_distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if trainer.compile and trainer.compile_scope == "model":
        train_model = torch.compile(train_model, mode=mode)
    return train_model


def _throughput_meter(model: nn.Module, cfg: TrainConfig, device: torch.device) -> ThroughputMeter:
    """The meter, with MFU when the device's peak is known (`trainer.peak_tflops` or a known GPU)."""
    peak = cfg.trainer.peak_tflops or device_peak_tflops(device)
    flops = training_flops_per_image(model, cfg.data.img_size, device) if peak else None
    return ThroughputMeter(device, flops, peak)


def _checkpoint_meta(cfg: TrainConfig, resolved: dict[str, Any], sha: str | None) -> dict[str, Any]:
    """What every checkpoint records besides the training state: architecture, config, code version."""
    return {
        "model_name": cfg.model.name,
        "model_args": model_args(cfg.model),
        "config": resolved,
        "config_hash": config_hash(resolved),
        "git_sha": sha,
    }
