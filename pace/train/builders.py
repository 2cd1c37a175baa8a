"""Builders: the only code that reads the typed config; each returns a ready object from timm or torch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_state_dict_from_hf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, freeze
from torch import nn

from pace.data import create_mixup
from pace.errors import RunError
from pace.eval.loading import drop_pretrained_state_dict, read_weights
from pace.train.config import AugConfig, ModelConfig, OptimConfig, SchedConfig

log = logging.getLogger(__name__)

RELEASE_WEIGHTS = "model.safetensors"


def model_args(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of `timm.create_model` for this config (stored in every checkpoint).

    Args:
        cfg: the model section of the config.
    """
    args: dict[str, Any] = dict(cfg.kwargs)
    args.update(num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path_rate)
    if cfg.img_size is not None:
        args["img_size"] = cfg.img_size
    return args


def resolve_pretrained(source: str) -> str:
    """The weight file behind `model.pretrained` (`hf-hub:` ids are returned unchanged).

    Args:
        source: a checkpoint file, a release folder holding `model.safetensors`, or `hf-hub:org/name`.

    Raises:
        FileNotFoundError: naming the key and the path when nothing is there.
    """
    if source.startswith("hf-hub:"):
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / RELEASE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained={source!r}: no checkpoint or release file at {path}")
    return str(path)


def _pretrained_overlay(source: str, classifier: str) -> dict[str, Any]:
    if source.startswith("hf-hub:"):
        state_dict = load_state_dict_from_hf(source.removeprefix("hf-hub:"))
    else:
        # The raw `model` weights of a checkpoint, as the authors fine-tune (the same reader as pace-eval).
        state_dict, _ = read_weights(source)
    # timm resets the head when num_classes differs from the pretrained config's count, so declare the count
    # the weights really have.
    overlay: dict[str, Any] = {"state_dict": state_dict}
    head = state_dict.get(f"{classifier}.weight")
    if head is not None:
        overlay["num_classes"] = head.shape[0]
    return overlay


def build_model(cfg: ModelConfig) -> nn.Module:
    """Create the timm model, loading `cfg.pretrained` through timm's pretrained machinery.

    The model's `checkpoint_filter_fn` adapts other formats and resolutions; timm resets the classifier when
    the class count changes.

    Args:
        cfg: the model section of the config.
    """
    kwargs = model_args(cfg)
    if cfg.pretrained:
        source = resolve_pretrained(cfg.pretrained)
        classifier = timm.models.get_pretrained_cfg_value(cfg.name, "classifier") or "head"
        overlay = _pretrained_overlay(source, classifier)
        if overlay.get("num_classes", cfg.num_classes) != cfg.num_classes:
            log.info("model.pretrained has %d classes; new %d-class head", overlay["num_classes"], cfg.num_classes)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        log.info("loading pretrained weights from %s", source)
    try:
        model = timm.create_model(cfg.name, **kwargs)
    except RuntimeError as e:
        if not cfg.pretrained or "state_dict" not in str(e):
            raise
        raise RunError(_pretrained_mismatch(cfg, e)) from e
    drop_pretrained_state_dict(model)
    if cfg.linear_probe:
        freeze_for_linear_probe(model, cfg.num_classes)
    return model


def _pretrained_mismatch(cfg: ModelConfig, error: RuntimeError) -> str:
    # torch lists every missing and unexpected key (pages of them); one line names both architectures instead.
    arch = None
    source = Path(str(cfg.pretrained)).expanduser()
    if source.is_file() and source.suffix in (".pt", ".pth"):
        try:
            arch = torch.load(source, map_location="cpu", weights_only=True, mmap=True).get("model_name")
        except Exception:  # not ours, or unreadable: say what we know
            arch = None
    held = f"a {arch!r} model" if arch else "weights"
    detail = str(error).splitlines()[0].removesuffix(":")
    return f"model.pretrained={cfg.pretrained} holds {held} that does not fit model.name={cfg.name!r} ({detail})"


def freeze_for_linear_probe(model: nn.Module, num_classes: int) -> None:
    """Re-initialise the classifier and freeze everything else (timm's `freeze`, which also turns BatchNorm into
    FrozenBatchNorm2d, so training mode does not move its statistics); PACE sketches stop being redrawn.

    Args:
        model: a timm model.
        num_classes: classes of the new head.
    """
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    head_params = {id(p) for p in head.parameters()}
    if not head_params:
        raise ValueError(f"model.linear_probe: {type(model).__name__} has no trainable classifier")
    # timm's freeze on the top-level children without the head (it also freezes their BatchNorm statistics);
    # then any parameter left outside the head (tokens held by the model itself, siblings of a nested head).
    freeze(model, [name for name, child in model.named_children() if not any(m is head for m in child.modules())])
    for param in model.parameters():
        if id(param) not in head_params:
            param.requires_grad = False
    # PACE attention redraws its random sketches each epoch; a frozen backbone keeps the ones it was loaded with,
    # so the probe trains and is evaluated on the very features the checkpoint produces.
    for module in model.modules():
        if getattr(module, "sketch_schedule", None) is not None:
            module.sketch_schedule = "fixed"
    log.info(
        "linear probe: %d trainable parameters (the classifier), %d frozen",
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters() if not p.requires_grad),
    )


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """`optim.lr`, or `base_lr` scaled linearly by the global batch.

    Args:
        cfg: the optimizer section of the config.
        global_batch: images per optimizer update over all ranks.
    """
    return cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / cfg.lr_base_size


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """timm optimizer: no weight decay on 1-D parameters and `no_weight_decay()` names; layer decay by
    the model's `group_matcher`.

    Args:
        model: the unwrapped model.
        cfg: the optimizer section of the config.
        global_batch: images per optimizer update over all ranks.
    """
    extra: dict[str, Any] = {}
    if cfg.betas is not None:
        extra["betas"] = tuple(cfg.betas)
    if cfg.eps is not None:
        extra["eps"] = cfg.eps
    return create_optimizer_v2(
        model,
        opt=cfg.opt,
        lr=peak_lr(cfg, global_batch),
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=True,
        layer_decay=cfg.layer_decay,
        **extra,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, updates_per_epoch: int) -> Scheduler:
    """timm scheduler stepped per optimizer update (`step_update(step)`).

    Args:
        optimizer: the optimizer whose learning rate it drives.
        cfg: the schedule section of the config.
        updates_per_epoch: optimizer updates per epoch.
    """
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        cooldown_epochs=cfg.cooldown_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    if scheduler is None:
        raise ValueError(f"sched.sched={cfg.sched!r} builds no scheduler")
    return scheduler


def build_ema(model: nn.Module, decay: float, warmup: bool) -> ModelEmaV3:
    """timm ModelEmaV3 of parameters and buffers.

    Args:
        model: the unwrapped model (after any DDP broadcast, so every rank starts from rank 0's weights).
        decay: EMA decay per update.
        warmup: timm's decay warm-up.
    """
    return ModelEmaV3(model, decay=decay, use_warmup=warmup)


def build_loss(cfg: AugConfig, mixing: bool) -> nn.Module:
    """Soft-target cross-entropy under Mixup/CutMix (which smooths the targets), else label-smoothing or plain
    cross-entropy.

    Args:
        cfg: the augmentation section of the config.
        mixing: batches are mixed (targets arrive as soft distributions).
    """
    if mixing:
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(cfg: AugConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix for the `aug` settings, or None when both are off.

    Args:
        cfg: the augmentation section of the config.
        num_classes: classes of the model (the soft targets' width).
    """
    return create_mixup(
        num_classes=num_classes,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.label_smoothing,
    )
