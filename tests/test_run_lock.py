"""One writer per run directory: a second command on a run in progress is refused naming the holder's host and pid;
a lock left by a dead process on this host is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import run_train, start_train

from pace.errors import RunError
from pace.train.run_lock import LOCK_NAME, RunLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunError, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()

    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0}))
    taker = RunLock(tmp_path)
    taker.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    taker.release()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path: Path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere-node-7", "pid": _dead_pid(), "time": 0}))
    with pytest.raises(RunError, match="on host elsewhere-node-7"):
        RunLock(tmp_path).acquire()


def _slurm_lock(directory: Path, job: str, restart: str) -> None:
    holder = {"host": "elsewhere-node-7", "pid": 4321, "time": 0, "slurm_job": job, "slurm_restart": restart}
    (directory / LOCK_NAME).write_text(json.dumps(holder))


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_from_another_node(tmp_path: Path, monkeypatch):
    # The job was killed on node 7 (no clean-up ran); SLURM requeued it (restart count 1) onto this node.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _slurm_lock(tmp_path, job="4242", restart="0")
    lock = RunLock(tmp_path)
    lock.acquire()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (held["pid"], held["slurm_job"], held["slurm_restart"]) == (os.getpid(), "4242", "1")
    lock.release()
    # Another job, or another step of this same run of the job, still holds it.
    for job, restart in (("5555", "0"), ("4242", "1")):
        _slurm_lock(tmp_path, job=job, restart=restart)
        with pytest.raises(RunError, match=rf"in use by pid 4321 on host elsewhere-node-7, SLURM job {job} "):
            RunLock(tmp_path).acquire()


def test_a_second_identical_command_is_refused_while_the_first_runs(tmp_path: Path):
    run_dir = tmp_path / "run"
    # Long enough to still be running when the second command starts.
    slow = ("sched.epochs=200", "trainer.ckpt_every_steps=0")
    first = start_train(run_dir, *slow)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.05)
        second = run_train(run_dir, *slow, full_errors=False)
        assert second.returncode == 1, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in line, line
        assert first.poll() is None  # the first run goes on undisturbed
        records = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "train/loss" in r]
        assert len(steps) == len(set(steps))  # no training step written twice
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0}))
    out = run_train(run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "taking over the lock" in (run_dir / "train.log").read_text()
    assert not (run_dir / LOCK_NAME).exists()  # released at the end
