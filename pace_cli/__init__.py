"""Console entry points (`pace-train`, `pace-eval`, `pace-make-shards`), kept outside the `pace` package.

`import pace` imports torch and timm (it registers the PACE models with timm), which takes one to several seconds.
A training job pre-empted in that time (SLURM and torchrun send SIGTERM) must still exit with 75, "requeue me",
not die by the signal. This module therefore imports only the standard library, installs the start-up handler,
and only then imports the command; the training loop later replaces the handler with its checkpointing one.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

# sysexits' EX_TEMPFAIL, the code `pace.errors.EXIT_REQUEUE` gives after a checkpoint on SIGTERM/SIGUSR1.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []


def _stop(signum: int, frame: Any) -> None:
    if _received:
        return  # already leaving: a second signal must not interrupt the first exit's clean-up
    _received.append(signum)
    # os.write, not print: the signal may arrive while the main thread holds sys.stderr's buffer lock.
    name = signal.Signals(signum).name
    os.write(2, f"pace-train: stopped by {name} during start-up, before training began: exit {EXIT_REQUEUE}\n".encode())
    sys.exit(EXIT_REQUEUE)


def train() -> None:
    """`pace-train`: Hydra-configured training (configs/train.yaml)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    from pace.train.main import main

    # A library's bare `except:` during the import may have swallowed the SystemExit; the signal still counts.
    if _received:
        sys.exit(EXIT_REQUEUE)
    main()


def evaluate() -> None:
    """`pace-eval`: Hydra-configured evaluation (configs/eval.yaml)."""
    from pace.eval.main import main

    main()


def make_shards() -> None:
    """`pace-make-shards`: write webdataset shards from an ImageNet-style folder."""
    from pace.data.make_shards import main

    main()
