"""The metric sink: rank 0 writes records to `metrics.jsonl` and, if configured, to wandb and TensorBoard."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pace.distributed import DistEnv
from pace.train.config import LoggerConfig

log = logging.getLogger(__name__)


def _records(path: Path) -> list[dict[str, Any]]:
    # A process killed (or a disk that filled) in the middle of a write leaves a torn last line: drop it, since
    # the resumed run writes that step again. A bad line elsewhere is damage to report, with the file's name.
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                log.warning("%s: ignoring a torn last line (%d characters)", path, len(line))
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({e})") from e
    return records


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricLogger:
    """Writes metric records to `metrics.jsonl` in the run dir and, if configured, to wandb and TensorBoard (event
    files under `<run_dir>/tensorboard`), rank 0 only.

    Args:
        run_dir: the run directory.
        env: this process's place in the job.
        cfg: wandb / TensorBoard settings (None, or both off: JSONL only).
        config: the resolved config recorded with the run.
        run_name: wandb run name.
    """

    def __init__(
        self,
        run_dir: str | Path,
        env: DistEnv,
        cfg: LoggerConfig | None,
        config: dict[str, Any],
        run_name: str,
    ) -> None:
        self.active = env.is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._tensorboard = None
        self._purge_step: int | None = None
        self._use_tensorboard = cfg is not None and cfg.tensorboard
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg is not None and cfg.wandb and cfg.mode != "disabled":
            import wandb

            # A run id derived from the run dir makes a restarted job continue the same wandb run.
            run_id = hashlib.sha1(str(self.path.parent.resolve()).encode()).hexdigest()[:16]
            self._wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                id=run_id,
                resume="allow",
                mode=cfg.mode,
                dir=str(self.path.parent),
                config=config,
                tags=list(cfg.tags),
            )

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run redoes them, so the file reads as one uninterrupted run).

        Args:
            step: the step of the checkpoint being resumed.
        """
        self._purge_step = step + 1  # TensorBoard hides the events of the abandoned steps
        if not self.active or not self.path.exists():
            return
        kept = [r for r in _records(self.path) if r.get("step", 0) <= step]
        _atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record `metrics` at optimizer update `step`.

        Args:
            metrics: name -> number.
            step: optimizer updates done so far.
        """
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._use_tensorboard:
            self._log_tensorboard(metrics, step)

    def _log_tensorboard(self, metrics: dict[str, Any], step: int) -> None:
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(
                log_dir=str(self.path.parent / "tensorboard"), purge_step=self._purge_step
            )
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._tensorboard.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        """Finish the wandb run and flush the TensorBoard events."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
