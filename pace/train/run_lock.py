"""One writer per run directory: a lock file holding the writer's host and pid.

Two identical commands started seconds apart would otherwise both write `runs/<name>`: the second resumes the
first one's checkpoint in progress and `metrics.jsonl` gets every step twice. The lock is a file created with
`O_EXCL` (atomic on local disks and NFSv3+); a lock left by a process that died on this host is taken over, one
held by another host is reported with its host and pid, since no process table there can be read. The exception
is a SLURM job requeued after its node failed or it was killed (no clean-up ran): the lock of an earlier run of the
same job id (an older `SLURM_RESTART_COUNT`) is taken over wherever it was taken, since SLURM never runs two
instances of one job at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from pace.errors import RunError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job} (since {started})"


def _slurm_run() -> tuple[str | None, str]:
    # (job id, restart count): a requeued job keeps its id and counts up SLURM_RESTART_COUNT.
    return os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")


def _is_stale(holder: dict, me: dict) -> bool:
    # Dead on this host, or an earlier run of this same (requeued) SLURM job.
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return True
    earlier_run = holder.get("slurm_restart") != me["slurm_restart"]
    return me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"] and earlier_run


class RunLock:
    """Exclusive use of a run directory by one job (taken by rank 0).

    Args:
        run_dir: the run directory (created if missing).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written right now, or torn: treated as held by an unknown process

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return True

    def acquire(self) -> None:
        """Take the lock, or take over a stale one: left by a dead process on this host or by an earlier run of
        this requeued SLURM job.

        Raises:
            RunError: another live process (or another host) holds the run directory.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        job, restart = _slurm_run()
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "slurm_job": job,
            "slurm_restart": restart,
        }
        if self._create(me):
            self.held = True
            return
        holder = self._read()
        if not _is_stale(holder, me):
            raise RunError(
                f"run directory {self.path.parent} is in use by {_describe(holder)}: one job per run; wait for it, "
                f"choose another name=..., or delete {self.path} if that process is gone"
            )
        log.warning(
            "taking over the lock of %s left by %s, which is no longer running", self.path.parent, _describe(holder)
        )
        # Remove and re-create: of two processes taking over at once, only one wins the O_EXCL create.
        self.path.unlink(missing_ok=True)
        if not self._create(me):
            raise RunError(f"run directory {self.path.parent} was just taken by {_describe(self._read())}")
        self.held = True

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
