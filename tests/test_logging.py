"""Logs a cluster user can read: plain progress lines (no tqdm `\\r` off a terminal), a torn metrics line
tolerated, TensorBoard event files, workers capped at the CPUs granted, and pace-eval's help, progress and epoch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import ROOT, make_tiny_shards, read_metrics, run_train, train_env

from pace.distributed import DistEnv, capped_workers
from pace.train.metric_logger import MetricLogger
from pace.train.progress import ProgressLine, format_duration


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("run")
    # progress_bar=true, but stdout/stderr are pipes: no bar, plain lines only.
    out = run_train(run_dir, "trainer.progress_bar=true", "logger=tensorboard", "trainer.log_every_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


def test_plain_progress_lines_every_n_steps_and_at_each_epoch_end(logged_run):
    run_dir, out = logged_run
    log = (run_dir / "train.log").read_text()
    steps = re.findall(
        r"epoch (\d)/2 step (\d)/8 \(\d/4 in epoch\) loss \d+\.\d{4} lr \S+ [\d.]+ img/s data-wait \d+% eta \S+", log
    )
    assert [(int(e), int(s)) for e, s in steps] == [(1, 2), (1, 4), (2, 6), (2, 8)]
    assert len(re.findall(r"epoch [12]/2 done: step [48]/8, \S+ this epoch, eta \S+; val/top1=", log)) == 2
    assert "epoch 1/2 step 2/8" in out.stdout  # the console gets the same lines
    assert "\r" not in out.stdout + out.stderr  # no tqdm bar in a log file


def test_progress_line_values_come_from_the_logged_record(logged_run):
    run_dir, _ = logged_run
    record = next(r for r in read_metrics(run_dir) if r["step"] == 4 and "train/loss" in r)
    line = next(s for s in (run_dir / "train.log").read_text().splitlines() if "step 4/8 (" in s)
    assert f"loss {record['train/loss']:.4f}" in line and f"lr {record['train/lr']:.3e}" in line
    assert f"{record['perf/images_per_s']:.1f} img/s" in line


def test_eta_and_durations():
    progress = ProgressLine(epochs=2, updates_per_epoch=10)
    assert progress.eta_s(5) != progress.eta_s(5)  # NaN before the clock starts
    progress._start, progress._start_step = time.monotonic() - 10.0, 0  # 10 s for 5 updates: 15 left take 30 s
    assert progress.eta_s(5) == pytest.approx(30.0, rel=0.05)
    assert format_duration(3725) == "01:02:05" and format_duration(90061) == "1d 01:01:01"


def test_tensorboard_events_hold_the_logged_scalars(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = logged_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    got = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert got.keys() == expected.keys() == {2, 4, 6, 8}
    assert all(got[s] == pytest.approx(expected[s], rel=1e-6) for s in got)
    assert [e.step for e in events.Scalars("val/top1")] == [4, 8]


def test_a_torn_last_metrics_line_is_dropped_and_the_file_rewritten_atomically(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "tr'
    )
    MetricLogger(tmp_path, DistEnv(), None, {}, "run").truncate_after(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_a_damaged_metrics_line_in_the_middle_names_the_file(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: line 2 is not a JSON record"):
        MetricLogger(tmp_path, DistEnv(), None, {}, "run").truncate_after(2)


def test_dataloader_workers_are_capped_at_the_cpus_granted(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert capped_workers(8, DistEnv()) == 2
    assert capped_workers(0, DistEnv()) == 0
    torchrun = DistEnv(rank=0, world_size=2, local_world_size=2, launcher="torchrun")
    assert capped_workers(8, torchrun) == 1  # two ranks share the two CPUs


def test_pace_eval_help_lists_only_evaluation_options():
    out = subprocess.run(
        [sys.executable, "-m", "pace.eval.main", "--help"], env=train_env(), capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "eval: default, imagenet" in out.stdout and "checkpoint:" in out.stdout
    for training_only in ("optim:", "sched:", "aug:", "trainer:", "experiment:", "debug:"):
        assert not re.search(rf"^{training_only}", out.stdout, re.M), training_only


def test_pace_eval_records_the_checkpoint_epoch_and_logs_progress(logged_run, tmp_path: Path):
    run_dir, _ = logged_run
    make_tiny_shards(tmp_path / "shards")  # 40 held-out 32 px images of 10 classes
    ckpt = run_dir / "checkpoints" / "step_00000006.pt"  # mid-way through the second epoch
    out_dir = tmp_path / "eval"
    cmd = [sys.executable, "-m", "pace.eval.main", f"model.checkpoint={ckpt}", f"hydra.run.dir={out_dir}"]
    cmd += ["eval=default", f"data.root={tmp_path / 'shards'}", "data.batch_size=10", "data.num_workers=0"]
    out = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((out_dir / "results.json").read_text())
    assert results["model"]["epoch"] == 1 and results["model"]["step"] == 6
    assert "eval: 4 batches, 40 samples on rank 0" in out.stdout + out.stderr
