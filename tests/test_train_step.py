"""The Trainer's train_step in-process: accumulation, precision, clipping, non-finite skips, stop signals."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from pace.data.synthetic_tensors import SyntheticTensors
from pace.distributed import DistEnv
from pace.train.builders import build_scheduler
from pace.train.checkpoint import CheckpointManager
from pace.train.config import SchedConfig, TrainerConfig
from pace.train.metric_logger import MetricLogger
from pace.train.stop_signals import StopSignals
from pace.train.trainer import Trainer


def make_trainer(tmp_path: Path, **options) -> Trainer:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=4, img_size=16, patch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = SyntheticTensors(num_samples=64, num_classes=4, img_size=16, batch_size=8, env=DistEnv())
    return Trainer(
        model=model,
        train_model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, SchedConfig(epochs=2, warmup_epochs=0), updates_per_epoch=8),
        loss_fn=nn.CrossEntropyLoss(),
        train_data=data,
        evaluators=[],
        checkpoints=CheckpointManager(tmp_path / "ckpt"),
        metrics=MetricLogger(tmp_path, DistEnv(), None, {}, "test"),
        env=DistEnv(),
        device=torch.device("cpu"),
        options=TrainerConfig(**{"precision": "fp32", "ema": False, "progress_bar": False, **options}),
        epochs=2,
        run_dir=tmp_path,
        checkpoint_meta={"model_args": {}},
    )


def _batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(4, (n,), generator=g)


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_two_micro_batches_make_the_same_update_as_one_batch(tmp_path: Path):
    images, targets = _batch(1)
    one = make_trainer(tmp_path / "a")
    one.train_step([(images, targets)])
    two = make_trainer(tmp_path / "b", grad_accum_steps=2)
    out = two.train_step([(images[:4], targets[:4]), (images[4:], targets[4:])])
    assert out.images == 8 and not out.skipped
    for a, b in zip(_params(one), _params(two)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_update_the_weights(tmp_path: Path, precision):
    trainer = make_trainer(tmp_path, precision=precision)
    before = _params(trainer)
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    # fp16: the GradScaler starts at 2**16 and halves its scale on overflowing gradients (an update it skips
    # itself, with a finite loss, so not counted as a non-finite skip) until the gradients fit.
    for seed in range(20):
        out = trainer.train_step([_batch(seed)])
        assert torch.isfinite(torch.tensor(out.loss)) and not out.skipped
        if any(not torch.equal(a, b) for a, b in zip(before, _params(trainer))):
            break
    else:
        pytest.fail("no update changed the weights")
    assert trainer.state.nonfinite_skips == 0


def test_clipping_reports_the_norm_before_clipping(tmp_path: Path):
    trainer = make_trainer(tmp_path)
    trainer.clip_grad = 1e-3
    before = _params(trainer)
    out = trainer.train_step([_batch(3)])
    assert out.grad_norm > 1e-3
    step = torch.cat([(b - a).flatten() for a, b in zip(before, _params(trainer))])
    assert step.norm() == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x clipped norm (plain SGD)


def test_a_nan_loss_skips_the_update_and_counts_it(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PACE_FAULT_NAN_STEP", "1")
    trainer = make_trainer(tmp_path)
    before = _params(trainer)
    out = trainer.train_step([_batch(4)])
    assert out.skipped and trainer.state.nonfinite_skips == 1 and trainer.state.step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _params(trainer)))
    assert not trainer.train_step([_batch(5)]).skipped  # the next update goes through


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signals_are_recorded_not_fatal(signum):
    previous = signal.getsignal(signum)
    with StopSignals() as stop:
        os.kill(os.getpid(), signum)
        assert stop.received == signum
    assert signal.getsignal(signum) == previous


def test_channels_last_step(tmp_path: Path):
    trainer = make_trainer(tmp_path, channels_last=True)
    trainer.model.to(memory_format=torch.channels_last)
    assert not trainer.train_step([_batch(6)]).skipped


def test_resume_choices(tmp_path: Path):
    first = make_trainer(tmp_path / "a")
    first.train_step([_batch(7)])
    first.save_checkpoint()
    saved = first.checkpoints.latest()

    again = make_trainer(tmp_path / "a")  # same run dir, resume=auto
    again.resume()
    assert again.state.step == 1
    assert all(torch.equal(a, b) for a, b in zip(_params(first), _params(again)))

    fresh = make_trainer(tmp_path / "a", resume="never")
    fresh.resume()
    assert fresh.state.step == 0

    explicit = make_trainer(tmp_path / "b", resume=str(saved))
    explicit.resume()
    assert explicit.state.step == 1

    missing = make_trainer(tmp_path / "c", resume=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="trainer.resume"):
        missing.resume()
