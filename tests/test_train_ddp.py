"""Two-process gloo DDP on CPU over tiny shards: training, checkpoints, evaluation summed over ranks, and a NaN
injected into one rank's loss caught on every rank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import make_tiny_shards, read_metrics, run_train

from pace.train.checkpoint import load_checkpoint

# PACE-ViT (BatchNorm stem, PACE blocks) under DDP; each rank reads its own training shards with one worker and
# its share of the 40 held-out images.
MODEL = ("model=pace_vit_test", "aug=deit")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, ...]:
    return make_tiny_shards(tmp_path_factory.mktemp("shards"))


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_ddp_trains_checkpoints_evaluates_and_skips_a_nan_on_every_rank(shards, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PACE_FAULT_NAN_STEP", "3")
    monkeypatch.setenv("PACE_FAULT_NAN_RANK", "1")
    out = run_train(tmp_path, *MODEL, *shards, nproc=2, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    # Rank 1 saw the NaN; rank 0's own loss was finite, yet both skipped step 3.
    logs = out.stdout + out.stderr
    skipped = [line for line in logs.splitlines() if "skipped update" in line]
    assert any("step 3 " in line and "on rank 1: loss=nan" in line for line in skipped), skipped
    assert any("step 3 " in line and "on rank 0: loss=" in line and "loss=nan" not in line for line in skipped)

    records = read_metrics(tmp_path)
    evals = [r for r in records if "val/top1" in r]
    assert [r["val/count"] for r in evals] == [40.0, 40.0]  # every image once, summed over both ranks
    assert math.isnan(next(r["train/loss"] for r in records if r["step"] == 3 and "train/loss" in r))

    final = load_checkpoint(tmp_path / "checkpoints" / "step_00000008.pt")
    assert final["world_size"] == 2 and len(final["rng"]) == 2
    assert final["trainer"]["nonfinite_skips"] == 1
    assert _all_finite(final["model"])
    assert final["model_name"] == "pace_vit_test" and "debug_nan_step" not in final["config"]["trainer"]
    assert (tmp_path / "release" / "model.safetensors").is_file()


def test_ddp_nan_with_stop_policy_stops_every_rank_and_keeps_the_last_checkpoint(shards, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PACE_FAULT_NAN_STEP", "6")
    monkeypatch.setenv("PACE_FAULT_NAN_RANK", "1")
    out = run_train(tmp_path, *MODEL, *shards, "trainer.on_nonfinite=stop", nproc=2, timeout=240)
    assert out.returncode != 0
    logs = out.stdout + out.stderr
    assert logs.count("non-finite loss or gradient at step 6") >= 2, logs[-4000:]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert saved == ["step_00000002.pt", "step_00000004.pt"]
    last = load_checkpoint(tmp_path / "checkpoints" / saved[-1])
    assert last["trainer"]["step"] == 4 and _all_finite(last["model"])
