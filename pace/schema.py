"""What the training and evaluation config schemas share: the range check and the `logger` section.

`pace.train.config` builds on `pace.eval.config` (training runs the evaluators of the `eval` group), so the parts
both need live here, below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise a `ValueError` naming the config key and its value when `ok` is false.

    Args:
        ok: the check's outcome.
        key: the full config key (`trainer.precision`).
        value: its value.
        expected: what a valid value looks like.
    """
    if not ok:
        raise ValueError(f"config key {key}={value!r} is invalid: expected {expected}")


@dataclass
class LoggerConfig:
    """Where metrics go besides `metrics.jsonl` in the run dir (always written by rank 0).

    Args:
        wandb: log to Weights & Biases.
        mode: wandb mode: "offline" (default; sync later with `wandb sync`), "online" or "disabled".
        project: wandb project.
        entity: wandb entity (None: the user's default).
        tags: wandb tags.
        tensorboard: also write TensorBoard event files into `<run_dir>/tensorboard` (training only).
    """

    wandb: bool = True
    mode: str = "offline"
    project: str = "pace"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    tensorboard: bool = False

    def __post_init__(self) -> None:
        modes = ("offline", "online", "disabled")
        require(self.mode in modes, "logger.mode", self.mode, f"one of {modes}")
