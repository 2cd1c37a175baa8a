"""Checkpoint files: atomic writes, keep-last-N plus best, weights_only loading, RNG capture."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pace.train.checkpoint import CheckpointManager, atomic_torch_save, load_checkpoint, rng_state, set_rng_state


def test_a_write_that_dies_midway_leaves_the_previous_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    manager = CheckpointManager(tmp_path)
    manager.remove_partial_files()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_keeps_the_last_n_and_the_best(tmp_path: Path):
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=2, keep_best=True)
    metrics = {10: 50.0, 20: 70.0, 30: 60.0, 40: 65.0}
    best = None
    for step, metric in metrics.items():
        is_best = best is None or metric > best
        best = metric if is_best else best
        manager.save({"step": step, "metric": metric}, step, is_best=is_best)
    assert [p.name for p in manager.step_files()] == ["step_00000030.pt", "step_00000040.pt"]
    assert manager.latest().name == "step_00000040.pt"
    assert load_checkpoint(tmp_path / "ckpts" / "best.pt") == {"step": 20, "metric": 70.0}


def test_only_tensors_and_primitives_so_weights_only_loads(tmp_path: Path):
    state = {"model": {"w": torch.randn(2, 2)}, "rng": [rng_state()], "config": {"a": [1, 2.0, None, "x"]}}
    atomic_torch_save(state, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["config"] == state["config"]


def test_rng_state_round_trip_replays_python_numpy_and_torch():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    saved = rng_state()
    first = (random.random(), np.random.randn(3).tolist(), torch.randn(3).tolist())
    set_rng_state(saved)
    assert (random.random(), np.random.randn(3).tolist(), torch.randn(3).tolist()) == first
