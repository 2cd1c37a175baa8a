"""White-box telemetry in a real training run: per-block records in metrics.jsonl, and training unchanged by them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from train_helpers import read_metrics, run_train, train_losses

import pace  # noqa: F401  (registers the models)
from pace.analysis import TELEMETRY_KEYS
from pace.train.checkpoint import load_checkpoint

# pace_vit_test (4 PACE blocks) on 32 px synthetic data: 2 epochs of 3 updates, a loss record every update.
TINY = ("model=pace_vit_test", "model.img_size=32", "trainer.limit_train_batches=3", "trainer.log_every_steps=1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, every in (("with", 2), ("without", 0)):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        proc = run_train(run_dir, *TINY, f"trainer.telemetry_every_steps={every}", "trainer.telemetry_images=4")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = run_dir
    return out


def _telemetry(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "pace/block0/R" in r]


def _final_checkpoint(run_dir: Path) -> dict:
    return load_checkpoint(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1])


def test_telemetry_records_every_block_every_n_steps(runs):
    records = _telemetry(runs["with"])
    assert [r["step"] for r in records] == [2, 4, 6]
    keys = {f"pace/block{i}/{k}" for i in range(4) for k in TELEMETRY_KEYS}
    for record in records:
        assert keys <= set(record)
        assert all(math.isfinite(record[k]) for k in keys)
        # alpha/beta/tau appear under this one name only.
        assert not any(k.startswith(("pace/alpha", "pace/beta", "pace/tau")) for k in record)
    assert _telemetry(runs["without"]) == []


def test_last_record_holds_the_final_weights_coefficients(runs):
    ckpt = _final_checkpoint(runs["with"])
    assert ckpt["trainer"]["step"] == 6
    model = timm.create_model(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    last = _telemetry(runs["with"])[-1]
    for i, block in enumerate(model.blocks):
        for name, value in block.coefficients().items():
            assert last[f"pace/block{i}/{name}"] == pytest.approx(float(value), rel=1e-6)


def test_training_is_bit_identical_with_and_without_telemetry(runs):
    losses = train_losses(runs["with"])
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == train_losses(runs["without"])
    with_t, without = _final_checkpoint(runs["with"])["model"], _final_checkpoint(runs["without"])["model"]
    assert with_t.keys() == without.keys()
    for key in with_t:  # parameters, BatchNorm statistics and the sketches
        assert torch.equal(with_t[key], without[key]), key
