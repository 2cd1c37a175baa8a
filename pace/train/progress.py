"""Plain progress lines for logs read after the fact (SLURM output files, `train.log`), where a tqdm bar's `\\r`
updates are noise: every `trainer.log_every_steps` updates and at each epoch's end, one line with the epoch, step,
loss, lr, global images/s, data-wait share and the estimated time to the end of the run.
"""

from __future__ import annotations

import math
import sys
import time


def format_duration(seconds: float) -> str:
    """`1d 02:03:04`, `02:03:04` or `--:--:--` when unknown.

    Args:
        seconds: a duration.
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def show_progress_bar(requested: bool, is_main: bool) -> bool:
    """Whether to draw tqdm: asked for, on rank 0, and stderr is a terminal.

    Args:
        requested: `trainer.progress_bar`.
        is_main: this is rank 0.
    """
    return requested and is_main and sys.stderr.isatty()


class ProgressLine:
    """Formats the progress lines of one training process; the ETA comes from this process's own pace.

    Args:
        epochs: epochs in the run.
        updates_per_epoch: optimizer updates per epoch.
    """

    def __init__(self, epochs: int, updates_per_epoch: int) -> None:
        self.epochs = epochs
        self.updates_per_epoch = updates_per_epoch
        self.total_steps = epochs * updates_per_epoch
        self._start: float | None = None
        self._start_step = 0

    def mark(self, step: int) -> None:
        """Start the clock the ETA is measured with (after the first update, so start-up is not counted).

        Args:
            step: the update count now.
        """
        if self._start is None:
            self._start, self._start_step = time.monotonic(), step

    def eta_s(self, step: int) -> float:
        """Seconds to the end of the run at this process's pace so far (evaluation included).

        Args:
            step: the update count now.
        """
        if self._start is None or step <= self._start_step:
            return math.nan
        per_step = (time.monotonic() - self._start) / (step - self._start_step)
        return per_step * max(self.total_steps - step, 0)

    def step_line(self, epoch: int, step: int, record: dict[str, float]) -> str:
        """The periodic line.

        Args:
            epoch: the epoch being trained (0-based).
            step: updates done.
            record: the metrics record just logged (`train/loss`, `train/lr`, `perf/images_per_s`, ...).
        """
        in_epoch = step - epoch * self.updates_per_epoch
        return (
            f"epoch {epoch + 1}/{self.epochs} step {step}/{self.total_steps} "
            f"({in_epoch}/{self.updates_per_epoch} in epoch) loss {record['train/loss']:.4f} "
            f"lr {record['train/lr']:.3e} {record['perf/images_per_s']:.1f} img/s "
            f"data-wait {100 * record['perf/data_wait_share']:.0f}% eta {format_duration(self.eta_s(step))}"
        )

    def epoch_line(self, epoch: int, step: int, seconds: float, results: dict[str, float]) -> str:
        """The end-of-epoch line with the epoch's duration and its evaluation.

        Args:
            epoch: the epoch that ended (0-based).
            step: updates done.
            seconds: the epoch's wall-clock time in this process (evaluation included).
            results: the epoch's evaluation metrics (may be empty).
        """
        shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items() if not k.endswith("_count"))
        return (
            f"epoch {epoch + 1}/{self.epochs} done: step {step}/{self.total_steps}, {format_duration(seconds)} "
            f"this epoch, eta {format_duration(self.eta_s(step))}" + (f"; {shown}" if shown else "")
        )
