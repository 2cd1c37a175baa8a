"""slurm/train.sbatch with stand-in `srun` and `scontrol`: one run dir and rendezvous for all nodes, and
checkpoint-then-requeue on the pre-emption signal."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import ROOT

FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun_args"
if [[ "$FAKE_MODE" == finish ]]; then exit 0; fi
trap 'echo TERM >> "$FAKE_LOG/srun_signals"; exit 75' TERM
touch "$FAKE_LOG/srun_started"
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) printf 'gpu7\\ngpu8\\n' ;;
  requeue) echo "requeue $2" >> "$FAKE_LOG/scontrol" ;;
esac
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_MODE": mode,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "pace-train",
        "SLURM_JOB_NODELIST": "gpu[7-8]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
    }
    script = ROOT / "slurm" / "train.sbatch"
    proc = subprocess.Popen(["bash", str(script), "experiment=quickstart"], env=env, cwd=tmp_path, text=True)
    return proc, log


def test_every_node_gets_one_run_dir_and_the_first_node_as_rendezvous(tmp_path: Path):
    proc, log = _start(tmp_path, "finish")
    assert proc.wait(timeout=30) == 0
    args = (log / "srun_args").read_text().splitlines()
    assert f"hydra.run.dir={tmp_path}/runs/pace-train-4242" in args
    assert "--rdzv_endpoint=gpu7:24242" in args and "--nnodes=2" in args and "--nproc_per_node=4" in args
    assert args[-1] == "experiment=quickstart"
    assert not (log / "scontrol").exists()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_stops_the_workers_then_requeues(tmp_path: Path, signum):
    proc, log = _start(tmp_path, "run")
    deadline = time.monotonic() + 30
    while not (log / "srun_started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 0
    assert (log / "srun_signals").read_text().split() == ["TERM"]
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"]
