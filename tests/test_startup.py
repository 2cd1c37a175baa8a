"""Start-up faults: SIGTERM before training begins still means "requeue me" (exit 75); a rank lost before the
rendezvous makes the others stop with a message after `trainer.rendezvous_timeout_s`, not the 30-minute default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from train_helpers import ROOT, train_command, train_env

from pace.errors import EXIT_REQUEUE


def test_sigterm_during_start_up_exits_for_requeue(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(run_dir),
        env=train_env(full_errors=False),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # Hydra has set up logging (train.log exists): the job is starting, no training step has run.
    deadline = time.monotonic() + 120
    while not (run_dir / "train.log").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_REQUEUE, proc.stderr.read()[-3000:]
    assert not (run_dir / "metrics.jsonl").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_lost_before_rendezvous_stops_the_other_with_a_message(tmp_path: Path):
    env = train_env(full_errors=False)
    # Rank 0 of 2 started alone, as when rank 1's node failed before it could join.
    env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cmd = train_command(tmp_path / "run", "trainer.rendezvous_timeout_s=3")
    start = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "rank 0 of 2: not every rank joined the rendezvous" in line and "within 3 s" in line, line
    assert time.monotonic() - start < 100
