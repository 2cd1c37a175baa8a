"""Knowledge distillation: DeiT's losses against plain float64 computations, the frozen teacher at its own input
size and normalisation, the hook in train_step, the `distill` config group, and a tiny end-to-end run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from test_train_step import make_trainer
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from train_helpers import ROOT, read_metrics, run_train, train_env

from pace.train.config import DistillConfig, register_configs, validate
from pace.train.distill import (
    DistillationLoss,
    TeacherView,
    build_distillation,
    build_teacher,
    enable_distilled_training,
)
from pace.train.trainer import Trainer

STUDENT_MEAN, STUDENT_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TEACHER_MEAN, TEACHER_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = 4  # test_train_step's student


class LinearTeacher(nn.Module):
    """A classifier that is a linear map of the flattened image, behind dropout (which only train mode applies)."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.pretrained_cfg = {"input_size": (3, size, size), "mean": mean, "std": std, "interpolation": "bilinear"}
        self.num_classes = CLASSES
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * size * size, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.flatten(1)))


def _affine64(teacher: LinearTeacher, x: torch.Tensor) -> torch.Tensor:
    return x.double().flatten(1) @ teacher.fc.weight.double().T + teacher.fc.bias.double()


def _log_softmax64(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _kl64(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    # sum_c p_t (log p_t - log p_s), per sample, at temperature tau.
    log_pt, log_ps = _log_softmax64(teacher.double() / tau), _log_softmax64(student.double() / tau)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def _ce64(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    return -(soft_targets.double() * _log_softmax64(logits)).sum(-1)


def _setup(seed: int = 0, size: int = 8) -> tuple[LinearTeacher, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = LinearTeacher(size, STUDENT_MEAN, STUDENT_STD)
    images = torch.randn(6, 3, size, size, generator=g)
    student = torch.randn(6, CLASSES, generator=g) * 3
    labels = torch.randint(CLASSES, (6,), generator=g)
    return teacher, images, student, labels


def _view(teacher: nn.Module, **kwargs) -> TeacherView:
    return TeacherView(teacher, student_mean=STUDENT_MEAN, student_std=STUDENT_STD, **kwargs)


@pytest.mark.parametrize(("alpha", "tau"), [(0.5, 1.0), (0.3, 3.0), (1.0, 0.5)])
def test_soft_loss_equals_a_plain_float64_kl(alpha, tau):
    teacher, images, student, labels = _setup()
    loss = DistillationLoss(nn.CrossEntropyLoss(), _view(teacher), kind="soft", alpha=alpha, tau=tau)
    got = loss(images, student, labels)
    t = _affine64(teacher, images)  # same size and normalisation: the teacher sees the batch as it is
    base = _ce64(student, F.one_hot(labels, CLASSES)).mean()
    expected = (1 - alpha) * base + alpha * tau**2 * _kl64(student, t, tau).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_hard_loss_under_mixup_targets_averages_ce_to_the_teacher_argmax():
    teacher, images, student, labels = _setup(1)
    mixed = 0.7 * F.one_hot(labels, CLASSES) + 0.3 * F.one_hot(labels.flip(0), CLASSES)
    loss = DistillationLoss(SoftTargetCrossEntropy(), _view(teacher), kind="hard", alpha=0.5, tau=1.0)
    got = loss(images, student, mixed)
    argmax = _affine64(teacher, images).argmax(-1)
    expected = 0.5 * _ce64(student, mixed).mean() + 0.5 * _ce64(student, F.one_hot(argmax, CLASSES)).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_distillation_head_takes_the_teacher_term_and_the_class_head_the_labels():
    teacher, images, student, labels = _setup(2)
    dist = student.flip(1) + 1.0
    loss = DistillationLoss(nn.CrossEntropyLoss(), _view(teacher), kind="soft", alpha=0.5, tau=2.0)
    got = loss(images, (student, dist), labels)
    kd = _kl64(dist, _affine64(teacher, images), 2.0).mean() * 4.0
    expected = 0.5 * _ce64(student, F.one_hot(labels, CLASSES)).mean() + 0.5 * kd
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_teacher_sees_the_batch_at_its_own_size_and_normalisation():
    torch.manual_seed(0)
    teacher = LinearTeacher(16, TEACHER_MEAN, TEACHER_STD)
    raw = torch.rand(4, 3, 32, 32)  # pixel values in [0, 1]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (STUDENT_MEAN, STUDENT_STD))
    view = _view(teacher)
    assert view.input_size == (16, 16)
    got = view((raw - mean) / std)
    # The teacher's own pipeline: resize the pixels, normalise with its statistics.
    tmean, tstd = (torch.tensor(v).view(1, 3, 1, 1) for v in (TEACHER_MEAN, TEACHER_STD))
    expected = _affine64(teacher, (F.interpolate(raw, size=(16, 16), mode="bilinear") - tmean) / tstd)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    # distill.teacher_input_size overrides the pretrained_cfg's size.
    assert _view(LinearTeacher(8, TEACHER_MEAN, TEACHER_STD), input_size=(8, 8)).input_size == (8, 8)


def _student_and_trainer(tmp_path: Path, distill: DistillationLoss, mixup: Mixup | None = None, **options) -> Trainer:
    # test_train_step's student (timm's test_vit, 16 px, 4 classes) with the distillation loss around its criterion.
    trainer = make_trainer(tmp_path, **options)
    trainer.loss_fn, trainer.distill, trainer.mixup = distill.base, distill, mixup
    return trainer


def _timm_teacher() -> nn.Module:
    torch.manual_seed(1)
    # Dropout and drop-path everywhere: any forward in train mode would change the logits.
    return timm.create_model("test_vit", num_classes=CLASSES, img_size=16, patch_size=8, drop_rate=0.5)


def test_train_step_uses_the_distillation_loss_and_leaves_the_teacher_frozen_in_eval_mode(tmp_path: Path):
    teacher = _timm_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill = DistillationLoss(nn.CrossEntropyLoss(), _view(teacher), kind="soft", alpha=0.5, tau=2.0)
    trainer = _student_and_trainer(tmp_path, distill)
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randint(CLASSES, (8,), generator=g)
    # The loss the step should report, computed plainly from the student before its update.
    trainer.model.train()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (STUDENT_MEAN, STUDENT_STD))
    tmean, tstd = (torch.tensor(teacher.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        student = trainer.model(images)
        # Built at 16 px: the teacher sees the batch unresized, renormalised to its own statistics.
        t = teacher.eval()((images * std + mean - tmean) / tstd)
    expected = 0.5 * _ce64(student, F.one_hot(labels, CLASSES)).mean() + 0.5 * 4.0 * _kl64(student, t, 2.0).mean()

    out = trainer.train_step([(images, labels)])
    assert out.loss == pytest.approx(float(expected), rel=1e-5)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    distill.train()  # what a caller putting the whole loss in train mode would do
    assert not any(m.training for m in teacher.modules())
    assert torch.equal(distill.teacher(images), distill.teacher(images))


def test_bf16_mixup_steps_with_a_teacher_update_the_student_only(tmp_path: Path):
    teacher = _timm_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill = DistillationLoss(SoftTargetCrossEntropy(), _view(teacher), kind="hard", alpha=0.5, tau=1.0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=CLASSES)
    trainer = _student_and_trainer(tmp_path, distill, mixup=mixup, precision="bf16")
    student_before = [p.detach().clone() for p in trainer.model.parameters()]
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        out = trainer.train_step([(torch.randn(8, 3, 16, 16, generator=g), torch.randint(CLASSES, (8,), generator=g))])
        assert not out.skipped and torch.isfinite(torch.tensor(out.loss))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, trainer.model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_teacher_from_one_of_our_checkpoints_keeps_its_weights_and_resolution(tmp_path: Path):
    teacher = _timm_teacher()
    path = tmp_path / "teacher.pt"
    args = {"num_classes": CLASSES, "img_size": 16, "patch_size": 8}
    run = {"data": {"img_size": 16}, "aug": {"crop_pct": 1.0, "interpolation": "bilinear"}}
    torch.save({"model_name": "test_vit", "model_args": args, "model": teacher.state_dict(), "config": run}, path)
    loaded = build_teacher(DistillConfig(kind="soft", teacher_checkpoint=str(path)), num_classes=CLASSES)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in loaded.state_dict().items())
    loss = build_distillation(
        DistillConfig(kind="hard", teacher_checkpoint=str(path)),
        nn.CrossEntropyLoss(),
        num_classes=CLASSES,
        mean=STUDENT_MEAN,
        std=STUDENT_STD,
        device=torch.device("cpu"),
    )
    assert loss is not None and loss.teacher.input_size == (16, 16) and loss.alpha == 0.5
    with pytest.raises(ValueError, match=r"distill\.teacher.*4 classes, the student 7"):
        build_teacher(DistillConfig(kind="soft", teacher_checkpoint=str(path)), num_classes=7)


def test_no_distillation_builds_nothing():
    cfg = DistillConfig()
    kwargs = {"num_classes": 3, "mean": STUDENT_MEAN, "std": STUDENT_STD, "device": torch.device("cpu")}
    assert build_distillation(cfg, nn.CrossEntropyLoss(), **kwargs) is None


# -- the config group --------------------------------------------------------------------------------------------


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("train", overrides=["debug=cpu", *overrides, "run_dir=unused"])


def test_the_distill_group_composes():
    assert validate(_compose()).distill.kind == "none"
    soft = validate(_compose("distill=soft", "distill.teacher=test_vit", "distill.tau=3")).distill
    assert (soft.kind, soft.alpha, soft.tau, soft.teacher) == ("soft", 0.5, 3.0, "test_vit")
    hard = validate(_compose("distill=hard", "distill.teacher_checkpoint=runs/x/checkpoints/best.pt")).distill
    assert (hard.kind, hard.alpha) == ("hard", 0.5)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("distill=soft",), "distill.teacher"),
        (("distill=soft", "distill.teacher=test_vit", "distill.tau=0"), "distill.tau"),
        (("distill=hard", "distill.teacher=test_vit", "distill.alpha=1.5"), "distill.alpha"),
        (("distill.kind=medium",), "distill.kind"),
        (("distill.token=true",), "distill.token"),
        (("distill=soft", "distill.teacher=test_vit", "distill.teacher_weights=best"), "distill.teacher_weights"),
    ],
)
def test_a_bad_distill_value_fails_naming_the_key(overrides, key):
    with pytest.raises(ValueError) as err:
        validate(_compose(*overrides))
    assert key in str(err.value)


def test_a_bad_distill_value_stops_the_cli_before_any_work(tmp_path: Path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pace.train.main", f"hydra.run.dir={run_dir}", "debug=cpu", "distill=hard"]
    out = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert "distill.teacher=None is invalid" in out.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_token_distillation_trains_a_distilled_students_second_head():
    cfg = DistillConfig(kind="hard", teacher="test_vit", token=True)
    with pytest.raises(ValueError, match=r"distill\.token=True is invalid: VisionTransformer has no distillation head"):
        enable_distilled_training(_timm_teacher(), cfg)
    tiny = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": CLASSES}
    student = timm.create_model("deit_tiny_distilled_patch16_224", **tiny)
    enable_distilled_training(student, cfg)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    cls_logits, dist_logits = student.train()(images)
    teacher = _timm_teacher()
    loss = DistillationLoss(nn.CrossEntropyLoss(), _view(teacher), kind="hard", alpha=0.5, tau=1.0)
    t = loss.teacher(images)
    expected = 0.5 * _ce64(cls_logits, F.one_hot(labels, CLASSES)).mean()
    expected = expected + 0.5 * _ce64(dist_logits, F.one_hot(t.argmax(-1), CLASSES)).mean()
    torch.testing.assert_close(loss(images, (cls_logits, dist_logits), labels).double(), expected)
    # At evaluation DeiT averages the two heads.
    with torch.no_grad():
        a, b = student.train()(images)  # no dropout in this model: train mode is deterministic
        averaged = student.eval()(images)
    torch.testing.assert_close(averaged, (a + b) / 2)


@pytest.mark.slow
def test_a_tiny_run_distils_from_a_trained_checkpoint(tmp_path: Path):
    teacher = run_train(tmp_path / "teacher")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    ckpt = sorted((tmp_path / "teacher" / "checkpoints").glob("step_*.pt"))[-1]
    # bf16 autocast and Mixup/CutMix soft targets on the student's side; the teacher at its own resolution.
    student = ("trainer.precision=bf16", "aug.mixup=0.8", "aug.cutmix=1.0", "distill.teacher_input_size=16")
    out = run_train(tmp_path / "student", "distill=soft", f"distill.teacher_checkpoint={ckpt}", *student)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distillation teacher: test_vit (checkpoint, model weights)" in out.stdout + out.stderr
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "student") if "train/loss" in r]
    assert losses and all(0 < x < 10 for x in losses)


@pytest.mark.slow
def test_two_process_ddp_distils_with_a_teacher_on_each_rank(tmp_path: Path):
    # The teacher is not wrapped in DDP: each rank scores its own batch; only the student's gradients are reduced.
    teacher = ("distill=hard", "distill.teacher=test_vit", "distill.teacher_pretrained=false")
    out = run_train(tmp_path, *teacher, "+distill.teacher_kwargs.img_size=32", nproc=2, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert losses and all(0 < x < 10 for x in losses)
    assert (tmp_path / "release" / "model.safetensors").is_file()


def test_a_second_token_in_pace_vits_class_attention_never_sees_the_image():
    # Why PACE-ViT has no distillation-token option (docs/training.md, Distillation): its class-attention blocks
    # take their query from position 0 only, so a token placed beside the class token is never updated from the
    # patch tokens; its output (and a head on it) would be the same for every image.
    import pace  # noqa: F401  (registers the PACE-ViT variants)

    model = timm.create_model("pace_vit_test", num_classes=CLASSES, img_size=32).eval()
    token = torch.randn(1, 1, model.embed_dim)
    outs = []
    with torch.no_grad():
        for seed in (0, 1):
            patches, _ = model._embed(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
            x = torch.cat((model.cls_token.expand(2, -1, -1), token.expand(2, -1, -1), patches), dim=1)
            for blk in model.cls_attn_blocks:
                x = blk(x)
            outs.append(x[:, :2])
    torch.testing.assert_close(outs[0][:, 1], outs[1][:, 1])  # the second token: image-independent
    assert not torch.allclose(outs[0][:, 0], outs[1][:, 0])  # the class token: read the images
