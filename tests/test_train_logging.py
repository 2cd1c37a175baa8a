"""Metric sinks and meters: metrics.jsonl, wandb offline (never online in tests), throughput, PACE telemetry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import pace  # noqa: F401  (registers the models)
from pace.distributed import DistEnv
from pace.train.config import LoggerConfig
from pace.train.metric_logger import MetricLogger
from pace.train.telemetry import pace_telemetry
from pace.train.throughput import ThroughputMeter


def test_jsonl_records_and_truncation_for_a_resumed_run(tmp_path: Path):
    logger = MetricLogger(tmp_path, DistEnv(), None, {"a": 1}, "run")
    for step in range(1, 6):
        logger.log({"train/loss": 1.0 / step}, step=step)
    logger.truncate_after(3)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["train/loss"] == 0.5


def test_only_rank_zero_writes(tmp_path: Path):
    logger = MetricLogger(tmp_path, DistEnv(rank=1, world_size=2), LoggerConfig(), {}, "run")
    logger.log({"x": 1.0}, step=1)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "wandb").exists()


def test_wandb_offline_writes_the_run_locally(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = {"model": {"name": "pace_vit_test"}, "git_sha": "abc"}
    logger = MetricLogger(tmp_path, DistEnv(), LoggerConfig(mode="offline", project="pace-test"), config, "run")
    logger.log({"train/loss": 0.5}, step=1)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert any(runs[0].rglob("*.wandb"))


def test_throughput_meter_summarises_its_window():
    meter = ThroughputMeter(torch.device("cpu"), flops_per_image=1e9, peak_tflops=1.0)
    meter.add(data_s=0.5, step_s=1.5, images=64)
    meter.add(data_s=0.5, step_s=1.5, images=64)
    out = meter.summary(world_size=4)
    assert out["perf/images_per_s"] == pytest.approx(4 * 128 / 4.0)
    assert out["perf/data_wait_share"] == pytest.approx(0.25)
    assert out["perf/step_time_s"] == pytest.approx(2.0)
    assert out["perf/mfu"] == pytest.approx(32 * 1e9 / 1e12)
    assert out["perf/peak_memory_gib"] > 0
    assert meter.summary(world_size=4)["perf/images_per_s"] == 0.0  # the window was reset


def test_pace_telemetry_names_every_block():
    model = timm.create_model("pace_vit_test", num_classes=10)
    images = torch.randn(2, 3, 64, 64)
    coeffs = pace_telemetry(model, images)
    assert len(coeffs) == 6 * len(model.blocks)  # alpha, beta, tau, R, Rc, dR
    for i, block in enumerate(model.blocks):
        for name, value in block.coefficients().items():
            assert coeffs[f"pace/block{i}/{name}"] == pytest.approx(float(value))
    assert pace_telemetry(timm.create_model("test_vit"), images) == {}
