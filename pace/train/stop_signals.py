"""Stop signals: SIGTERM/SIGUSR1 (SLURM pre-emption) are recorded, so training stops between two updates."""

from __future__ import annotations

import signal
from contextlib import AbstractContextManager
from typing import Any


class StopSignals(AbstractContextManager):
    """Records SIGTERM/SIGUSR1 (SLURM pre-emption) so the loop can stop between two updates.

    Args:
        signums: the signals to catch.
    """

    def __init__(self, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signums = signums
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
