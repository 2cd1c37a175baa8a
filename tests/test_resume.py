"""A run killed mid-epoch (SIGKILL) or stopped (SIGTERM) and restarted with the same command continues from its
last checkpoint and reproduces the uninterrupted run exactly: the per-step losses and the final weights."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, run_train, train_command, train_env, train_losses

from pace.train.checkpoint import load_checkpoint
from pace.train.trainer import EXIT_REQUEUE

# 3 epochs x 12 updates; checkpoints every 5 updates (mid-epoch) and at each epoch end. Mixup/CutMix draw from
# numpy, drop-path from torch, so the RNG states must be restored too; the EMA and AdamW state must match.
RUN = (
    "sched.epochs=3",
    "data.synthetic_train_samples=96",
    "trainer.limit_train_batches=12",
    "trainer.ckpt_every_steps=5",
    "trainer.log_every_steps=1",
    "trainer.ema=true",
    "trainer.ema_decay=0.9",
    "model.drop_path_rate=0.1",
    "aug=deit",
)
FINAL_STEP = 36


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    out = run_train(run_dir, *RUN)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        train_command(run_dir, *RUN),
        env=train_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, f"training ended before step {step}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.002)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def _assert_same_final_state(a: Path, b: Path) -> None:
    ckpt_a = load_checkpoint(a / "checkpoints" / f"step_{FINAL_STEP:08d}.pt")
    ckpt_b = load_checkpoint(b / "checkpoints" / f"step_{FINAL_STEP:08d}.pt")
    for key in ("model", "model_ema"):
        assert ckpt_a[key].keys() == ckpt_b[key].keys()
        for name, tensor in ckpt_a[key].items():
            assert torch.equal(tensor, ckpt_b[key][name]), f"{key}.{name} differs"
    for pid, state in ckpt_a["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, ckpt_b["optimizer"]["state"][pid][name]), f"optimizer state {pid}.{name}"
    assert ckpt_a["trainer"] == ckpt_b["trainer"]


def test_sigkill_mid_epoch_then_same_command_reproduces_the_uninterrupted_run(reference: Path, tmp_path: Path):
    kill_at = random.Random(4).randint(7, 14)  # past the first checkpoint (step 5), inside epoch 0 or 1
    run_dir = tmp_path / "killed"
    proc = _start(run_dir)
    _wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert saved and f"step_{FINAL_STEP:08d}.pt" not in saved, saved

    out = run_train(run_dir, *RUN)  # the same command
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()

    expected = train_losses(reference)
    assert sorted(expected) == list(range(1, FINAL_STEP + 1))
    assert train_losses(run_dir) == expected  # exact floats, every step
    _assert_same_final_state(reference, run_dir)


def test_sigterm_checkpoints_exits_for_requeue_and_resumes_exactly(reference: Path, tmp_path: Path):
    run_dir = tmp_path / "preempted"
    proc = _start(run_dir)
    _wait_for_step(proc, run_dir, 8)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_REQUEUE, proc.stderr.read()[-3000:]
    stopped = load_checkpoint(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1])
    assert 8 <= stopped["trainer"]["step"] < FINAL_STEP

    out = run_train(run_dir, *RUN)
    assert out.returncode == 0, out.stderr[-3000:]
    assert train_losses(run_dir) == train_losses(reference)
    _assert_same_final_state(reference, run_dir)
