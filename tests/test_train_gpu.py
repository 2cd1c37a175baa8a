"""The training entry point on a CUDA device: PACE-ViT compiled, bf16 autocast, EMA, eval, then a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import read_metrics, run_train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = (
    "model=pace_vit_test",
    "trainer.device=cuda",
    "trainer.precision=bf16",
    "trainer.compile=true",
    "trainer.ema=true",
)


def test_compiled_bf16_run_trains_evaluates_and_resumes_on_cuda(tmp_path: Path):
    run_dir = tmp_path / "run"
    first = run_train(run_dir, *GPU, "sched.epochs=2", timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    records = read_metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    evals = [r for r in records if "val/top1" in r]
    assert [r["epoch"] for r in evals] == [0, 1]
    assert all("ema/val/top1" in r for r in evals)
    steps_after_first = max(r["step"] for r in records if "step" in r)

    # The same command with more epochs continues from the last checkpoint instead of starting again.
    second = run_train(run_dir, *GPU, "sched.epochs=3", timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records if "val/top1" in r] == [0, 1, 2]
    assert max(r["step"] for r in records if "step" in r) > steps_after_first
