"""Start-up faults: SIGTERM before training begins still means "requeue me" (exit 75), from the console script's
first line on; a rank lost before the rendezvous makes the others stop with a message after
`trainer.rendezvous_timeout_s`, not the 30-minute default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import FAST, ROOT, read_metrics, train_command, train_env

from pace.errors import EXIT_REQUEUE, exit_on_stop_signals

_STOPPED = "pace-train: stopped by SIGTERM during start-up, before training began: exit 75\n"


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
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and stderr.endswith(_STOPPED), stderr[-3000:]  # the console script's line too
    assert not (run_dir / "metrics.jsonl").exists()


# What the installed `pace-train` script runs (pip writes `from pace_cli import train; sys.exit(train())`).
_CONSOLE_SCRIPT = "import sys; from pace_cli import train; sys.argv[0] = 'pace-train'; sys.exit(train())"


def _catches(pid: int, signum: int) -> bool:
    # SigCgt: the hex mask of signals with a handler; bit n-1 is signal n.
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_sigterm_while_the_console_script_imports_torch_exits_for_requeue(tmp_path: Path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", _CONSOLE_SCRIPT, f"hydra.run.dir={run_dir}", *FAST]
    proc = subprocess.Popen(cmd, env=train_env(full_errors=False), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, signal.SIGTERM):  # the launcher's first lines have run
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.001)
    # torch is not loaded yet: the signal arrives during `import pace` (torch, timm), before any Hydra code.
    assert "libtorch_cpu" not in Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_REQUEUE, proc.stderr.read()[-3000:]
    stderr = proc.stderr.read()
    assert stderr == _STOPPED, stderr
    assert not run_dir.exists()


def test_the_console_script_trains(tmp_path: Path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", _CONSOLE_SCRIPT, f"hydra.run.dir={run_dir}", *FAST]
    out = subprocess.run(cmd, env=train_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps and steps == sorted(set(steps))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))


def test_a_second_stop_signal_does_not_interrupt_the_first_ones_exit():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    exit_on_stop_signals()
    try:
        with pytest.raises(SystemExit) as first:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode; the sleep is interrupted
        assert first.value.code == EXIT_REQUEUE
        # The clean-up (lock release, failed-start removal) runs while the second copy arrives.
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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


def test_a_stop_signal_after_the_training_loop_names_that_phase(tmp_path: Path, capfd):
    # After the loop's checkpointing handler is gone, a SIGTERM (during the final evaluation or the release export)
    # exits 75 at once; its line must not claim that training never began.
    import torch
    from omegaconf import OmegaConf
    from test_configs import compose_train

    from pace.distributed import DistEnv
    from pace.train.assemble import build_trainer
    from pace.train.config import validate

    composed = compose_train(*FAST)
    composed.run_dir = str(tmp_path / "run")
    cfg = validate(composed)
    resolved = OmegaConf.to_container(composed, resolve=True)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    exit_on_stop_signals()
    try:
        build_trainer(cfg, env=DistEnv(), device=torch.device("cpu"), resolved=resolved).fit()
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stopped.value.code == EXIT_REQUEUE
        line = capfd.readouterr().err.splitlines()[-1]
        assert line == (
            "pace-train: stopped by SIGTERM after the last checkpoint, before the run finished (a restart evaluates "
            "and exports again): exit 75"
        ), line
    finally:
        exit_on_stop_signals()  # back to the start-up wording for the other tests
        for signum, handler in previous.items():
            signal.signal(signum, handler)
