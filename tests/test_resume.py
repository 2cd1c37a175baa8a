"""A run killed mid-epoch (SIGKILL) or stopped (SIGTERM) and restarted with the same command continues from its
last checkpoint and reproduces the uninterrupted run exactly: the per-step losses and the final weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_helpers import make_tiny_shards, run_train, start_train, train_losses

from pace.train.checkpoint import load_checkpoint
from pace.train.trainer import EXIT_REQUEUE

# PACE-ViT (sketches redrawn each epoch, kept in sync with its EMA copy) on the generated shapes shards read by
# one DataLoader worker with RandAugment, random erasing and Mixup/CutMix (seeded per sample and per batch by the
# data pipeline), drop-path from torch's RNG, EMA and AdamW state:
# 3 epochs x 10 updates, checkpoints every 4 updates (mid-epoch) and at each epoch end.
RUN = (
    "model=pace_vit_test",
    "sched.epochs=3",
    "trainer.limit_train_batches=null",
    "trainer.ckpt_every_steps=4",
    "trainer.log_every_steps=1",
    "trainer.ema=true",
    "trainer.ema_decay=0.9",
    "model.drop_path_rate=0.1",
    "aug=deit",
)
FINAL_STEP = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, ...]:
    return make_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    out = run_train(run_dir, *RUN, *shards)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


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


def test_sigkill_mid_epoch_then_same_command_reproduces_the_uninterrupted_run(reference, shards, tmp_path: Path):
    kill_at = random.Random(4).randint(6, 18)  # past the first checkpoint (step 4)
    run_dir = tmp_path / "killed"
    proc = start_train(run_dir, *RUN, *shards)
    _wait_for_step(proc, run_dir, kill_at)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert saved and f"step_{FINAL_STEP:08d}.pt" not in saved, saved

    out = run_train(run_dir, *RUN, *shards)  # the same command
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()

    expected = train_losses(reference)
    assert sorted(expected) == list(range(1, FINAL_STEP + 1))
    assert train_losses(run_dir) == expected  # exact floats, every step
    _assert_same_final_state(reference, run_dir)


def test_sigterm_to_the_process_group_checkpoints_exits_for_requeue_and_resumes_exactly(reference, shards, tmp_path):
    # torchrun and SLURM signal the whole process group, DataLoader workers included.
    run_dir = tmp_path / "preempted"
    proc = start_train(run_dir, *RUN, *shards)
    _wait_for_step(proc, run_dir, 7)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_REQUEUE, proc.stderr.read()[-3000:]
    stopped = load_checkpoint(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1])
    assert 7 <= stopped["trainer"]["step"] < FINAL_STEP

    out = run_train(run_dir, *RUN, *shards)
    assert out.returncode == 0, out.stderr[-3000:]
    assert train_losses(run_dir) == train_losses(reference)
    _assert_same_final_state(reference, run_dir)


@pytest.mark.slow
def test_sigkill_resume_is_exact_under_the_reference_sketch_schedule(shards, tmp_path: Path):
    # The in1k experiments' schedule: a fresh sketch every step from epoch 1, drawn from a counter that a resumed
    # run must restore from the checkpoint (killed in epoch 1, after its mid-epoch checkpoint at step 12 or 16).
    run = (*RUN, "+model.kwargs.sketch_schedule=reference")
    uninterrupted = tmp_path / "uninterrupted"
    out = run_train(uninterrupted, *run, *shards)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "killed"
    proc = start_train(run_dir, *run, *shards)
    _wait_for_step(proc, run_dir, 17)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    out = run_train(run_dir, *run, *shards)
    assert out.returncode == 0, out.stderr[-3000:]
    assert train_losses(run_dir) == train_losses(uninterrupted)
    _assert_same_final_state(uninterrupted, run_dir)
