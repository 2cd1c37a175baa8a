"""DeiT knowledge distillation: a frozen teacher and the loss that mixes its targets with the base loss.

The teacher is timm's `DistillationTeacher` (eval mode, its own normalisation from its pretrained_cfg) around a
model built from a timm name or loaded through `pace.eval.load_model` (our checkpoints and releases). It sees the
student's batch after Mixup/CutMix, resized to its own input size and renormalised, under `no_grad`.

Reference: Touvron et al., "Training data-efficient image transformers & distillation through attention" (DeiT),
https://github.com/facebookresearch/deit (losses.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.task import DistillationTeacher
from torch import nn

from pace.eval.loading import load_model
from pace.eval.transform import eval_data_config
from pace.train.config import DistillConfig

log = logging.getLogger(__name__)


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), averaged over the batch (DeiT's soft loss).

    DeiT's released code divides the summed KL by `numel()` (batch x classes); this is the paper's per-sample
    KL, as timm's `TokenDistillationTask` computes it.

    Args:
        student_logits: (B, num_classes).
        teacher_logits: (B, num_classes).
        tau: softmax temperature.
    """
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau * tau


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's argmax class (DeiT's hard distillation).

    Args:
        student_logits: (B, num_classes).
        teacher_logits: (B, num_classes).
    """
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


class TeacherView(nn.Module):
    """A frozen teacher that scores the student's batch at its own input size and normalisation.

    Args:
        model: the teacher (any timm classifier); frozen and put in eval mode here.
        student_mean: per-channel mean the student's batch was normalised with.
        student_std: per-channel std the student's batch was normalised with.
        input_size: the teacher's (H, W); None: its pretrained_cfg's `input_size`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        student_mean: tuple[float, ...],
        student_std: tuple[float, ...],
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        model.requires_grad_(False)
        # timm's wrapper: eval mode, and the teacher's mean/std from its pretrained_cfg as buffers.
        self.teacher = DistillationTeacher(model)
        # The teacher's eval transform: its pretrained_cfg, or the size a fixed-size model was built for.
        cfg = eval_data_config(model)
        self.input_size = tuple(input_size or cfg["input_size"][-2:])
        self.interpolation = "bicubic" if cfg["interpolation"] == "bicubic" else "bilinear"
        self.register_buffer("student_mean", torch.tensor(student_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("student_std", torch.tensor(student_std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> TeacherView:
        """Keep the teacher in eval mode whatever the caller asks (dropout, drop-path and BatchNorm stay fixed)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, num_classes) in float32 for the student's (normalised, mixed) images (B, 3, H, W)."""
        images = images.detach()
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode=self.interpolation, align_corners=False)
        images = self.teacher.normalize_input(images, self.student_mean, self.student_std)
        return self.teacher(images).float()


class DistillationLoss(nn.Module):
    """DeiT's distillation loss around the base criterion.

    soft: (1 - alpha) * base + alpha * tau^2 * KL(teacher_tau || student_tau).
    hard: (1 - alpha) * base + alpha * CE(student, argmax teacher); DeiT uses alpha = 0.5.
    A student that returns `(class_logits, dist_logits)` in training (a distillation token or head) has the base
    loss on the first and the distillation loss on the second, as in DeiT's token variant.

    Args:
        base: the criterion on (logits, targets) (soft targets under Mixup/CutMix).
        teacher: the frozen teacher view.
        kind: "soft" or "hard".
        alpha: weight of the distillation term.
        tau: temperature of the soft loss.
    """

    def __init__(self, base: nn.Module, teacher: TeacherView, *, kind: str, alpha: float, tau: float) -> None:
        super().__init__()
        if kind not in ("soft", "hard"):
            raise ValueError(f"distillation kind must be 'soft' or 'hard', got {kind!r}")
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(
        self, images: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        """The mixed loss.

        Args:
            images: the batch the student saw (after Mixup/CutMix), (B, 3, H, W).
            outputs: student logits (B, num_classes), or `(class_logits, dist_logits)`.
            targets: class indices (B,) or soft targets (B, num_classes).
        """
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = self.base(cls_logits, targets)
        teacher_logits = self.teacher(images)
        if teacher_logits.shape != dist_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} vs student {tuple(dist_logits.shape)}")
        if self.kind == "soft":
            kd = soft_distillation_loss(dist_logits, teacher_logits, self.tau)
        else:
            kd = hard_distillation_loss(dist_logits, teacher_logits)
        return (1.0 - self.alpha) * base + self.alpha * kd


def build_teacher(cfg: DistillConfig, num_classes: int) -> nn.Module:
    """The teacher model `distill.teacher` / `distill.teacher_checkpoint` name, on the CPU, in eval mode.

    Args:
        cfg: the distillation section of the config.
        num_classes: the student's class count, which the teacher must have.

    Raises:
        ValueError: naming `distill.teacher` when the teacher's class count differs from the student's.
    """
    kwargs = dict(cfg.teacher_kwargs)
    if cfg.teacher_checkpoint is None:
        kwargs.setdefault("num_classes", num_classes)
    loaded = load_model(
        cfg.teacher,
        checkpoint=cfg.teacher_checkpoint,
        pretrained=cfg.teacher_pretrained,
        weights=cfg.teacher_weights,
        model_kwargs=kwargs,
    )
    teacher = loaded.model
    if getattr(teacher, "num_classes", num_classes) != num_classes:
        where = cfg.teacher_checkpoint or cfg.teacher
        raise ValueError(
            f"config key distill.teacher: {where!r} has {teacher.num_classes} classes, the student {num_classes}"
        )
    log.info("distillation teacher: %s (%s, %s weights)", loaded.name, loaded.source, loaded.weights)
    return teacher


def build_distillation(
    cfg: DistillConfig,
    base: nn.Module,
    *,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
) -> DistillationLoss | None:
    """The distillation loss of `cfg` (None for `distill.kind=none`).

    Args:
        cfg: the distillation section of the config.
        base: the base criterion.
        num_classes: the student's class count.
        mean: the training batches' normalisation mean.
        std: the training batches' normalisation std.
        device: where the teacher runs.
    """
    if cfg.kind == "none":
        return None
    size = (cfg.teacher_input_size, cfg.teacher_input_size) if cfg.teacher_input_size else None
    view = TeacherView(build_teacher(cfg, num_classes), student_mean=mean, student_std=std, input_size=size)
    return DistillationLoss(base, view.to(device), kind=cfg.kind, alpha=cfg.alpha, tau=cfg.tau)


def enable_distilled_training(model: nn.Module, cfg: DistillConfig) -> None:
    """With `distill.token`, make the student return `(class_logits, dist_logits)` in training.

    Args:
        model: the unwrapped student.
        cfg: the distillation section of the config.

    Raises:
        ValueError: naming `distill.token` when the student has no distillation head.
    """
    if not cfg.token:
        return
    if not hasattr(model, "set_distilled_training"):
        raise ValueError(
            f"config key distill.token=True is invalid: {type(model).__name__} has no distillation head "
            "(set_distilled_training); use a distilled model or distill.token=false"
        )
    model.set_distilled_training(True)
