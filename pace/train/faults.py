"""Fault injection for tests, kept out of the run config: the environment of the training processes asks for it.

`PACE_FAULT_NAN_STEP=K` (with `PACE_FAULT_NAN_RANK=R`, default 0) makes the loss of optimizer update K non-finite
on rank R, so a test (or a user trying `trainer.on_nonfinite`) sees every rank skip or stop at that update.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pace.errors import UsageError

log = logging.getLogger(__name__)

NAN_STEP = "PACE_FAULT_NAN_STEP"
NAN_RANK = "PACE_FAULT_NAN_RANK"


@dataclass(frozen=True)
class NanFault:
    """Poison the loss of one optimizer update on one rank.

    Args:
        step: the optimizer update (1-based, as `trainer.state.step` after it).
        rank: the rank whose loss is poisoned.
    """

    step: int
    rank: int = 0

    def poisons(self, step: int, rank: int) -> bool:
        """Whether the loss of update `step` on `rank` must become non-finite."""
        return step == self.step and rank == self.rank


def _int_variable(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"environment variable {name}={value!r} is invalid: expected an integer") from None


def nan_fault_from_env(environ: Mapping[str, str] | None = None) -> NanFault | None:
    """The NaN fault the environment asks for, or None.

    Args:
        environ: the process environment (default `os.environ`); tests pass a dict.

    Raises:
        UsageError: naming a variable that is not an integer.
    """
    env = os.environ if environ is None else environ
    if not env.get(NAN_STEP):
        return None
    fault = NanFault(step=_int_variable(env, NAN_STEP), rank=_int_variable(env, NAN_RANK, "0"))
    log.warning(
        "fault injection: the loss of update %d on rank %d will be non-finite (%s)", fault.step, fault.rank, NAN_STEP
    )
    return fault
