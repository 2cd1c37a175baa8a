"""A command that fails before it has written anything of its own leaves no directory behind.

Hydra creates the output directory, with any missing parents (`runs/`, `runs/eval/`), before the task runs.
`RecordNewDirectories`, a Hydra callback (`hydra.callbacks` in the configs), notes which of them did not exist
yet; `discard_failed_start` removes the output directory when it holds nothing but the log Hydra opened, and then
those of its parents that this command created and that are now empty. A parent that existed before is never
removed, even when empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# The log files Hydra opens in the output directory (`<task>.log`: pace-train and pace-eval set the name).
HYDRA_LOGS = ("train.log", "main.log")
# What Hydra writes into a sweep directory when a multirun starts.
SWEEP_RECORD = "multirun.yaml"

# Directories this process created for its output, absolute (see `remember_new_directories`).
_created: set[Path] = set()


def remember_new_directories(path: str | Path) -> None:
    """Note which of `path` and its parents do not exist yet, before they are created.

    Args:
        path: a directory about to be created with its parents.
    """
    path = Path(path).absolute()
    for directory in (path, *path.parents):
        if directory.exists():
            break
        _created.add(directory)


def discard_failed_start(run_dir: Path) -> None:
    """Remove a command's output directory when it holds nothing but Hydra's log, and the parents it created.

    A directory holding anything else (another run, another job's lock, results) is left alone, and so are its
    parents.

    Args:
        run_dir: the command's output directory.
    """
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - set(HYDRA_LOGS):
        return
    for name in HYDRA_LOGS:
        (run_dir / name).unlink(missing_ok=True)
    run_dir.rmdir()
    for parent in run_dir.parents:
        if parent not in _created or not parent.is_dir() or {p.name for p in parent.iterdir()} - {SWEEP_RECORD}:
            break
        # A sweep directory this command created, holding only Hydra's record of the sweep: the sweep's first job
        # failed before it wrote anything, which ends the sweep (a finished job's directory would keep it).
        (parent / SWEEP_RECORD).unlink(missing_ok=True)
        parent.rmdir()
        _created.discard(parent)


class RecordNewDirectories(Callback):
    """Hydra callback: note the output directory's missing parents before Hydra creates them."""

    def _remember(self, config: DictConfig, key: str) -> None:
        directory = OmegaConf.select(config, key)
        if directory is not None:
            remember_new_directories(str(directory))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before `hydra.run.dir` is created (a single run)."""
        self._remember(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before `hydra.sweep.dir` is created (a sweep's jobs are directories inside it)."""
        self._remember(config, "hydra.sweep.dir")
