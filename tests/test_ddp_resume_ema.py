"""A 2-rank DDP run with EMA restarted from its epoch-end checkpoint evaluates exactly like the uninterrupted run.

On CPU each rank keeps its own BatchNorm statistics (no SyncBatchNorm kernel), and the EMA copy averages them per
rank; a resumed rank 1 restarts its EMA from rank 0's saved copy. Evaluation therefore first makes every rank hold
rank 0's buffers (what the checkpoint holds), so `ema/val/loss` does not depend on when the job was restarted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from train_helpers import make_tiny_shards, read_metrics, run_train

RUN = (
    "model=pace_vit_test",
    "aug=deit",
    "sched.epochs=2",
    "trainer.ema=true",
    "trainer.ema_decay=0.9",
    "trainer.ckpt_every_steps=0",
    "trainer.keep_last=5",
)


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "ema/val/loss" in r]


@pytest.mark.slow
def test_two_rank_resume_with_ema_evaluates_exactly_like_the_uninterrupted_run(tmp_path: Path):
    shards = make_tiny_shards(tmp_path / "shards")
    reference = tmp_path / "reference"
    out = run_train(reference, *RUN, *shards, nproc=2, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    saved = sorted((reference / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 2, saved

    # A job that died right after the epoch-0 checkpoint: the same directory without the epoch-1 checkpoint.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed, ignore=shutil.ignore_patterns(saved[-1].name, "release"))
    out = run_train(resumed, *RUN, *shards, nproc=2, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in (resumed / "train.log").read_text()

    expected, got = _evals(reference), _evals(resumed)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for key in ("val/loss", "val/top1", "ema/val/loss", "ema/val/top1"):
        assert got[-1][key] == expected[-1][key], key
