"""How the loaders start their worker processes: from a fork server, never by forking the training process.

A training process has threads (the process group's, the launcher's, CUDA's). Forking it while one of them holds a
lock leaves that lock held forever in the child. CPython has had such a lock itself, 3.11.7 among the releases
(gh-112275: the interpreter's thread-state list, taken by any C++ thread that enters Python), and a worker forked at
the wrong moment hangs inside `os.fork()` before running a line of Python; the loader then waits on it for ever. A
2-rank CPU run with one worker, four such runs at a time on 2 cores, hung this way 2 times in 62.

multiprocessing's fork server is a fresh single-threaded interpreter that imports the data pipeline once and forks
each worker from itself (the default start method from Python 3.14). A worker then costs what a fork costs; the
server's start costs one interpreter import per process (about 3 s on a 2-core machine), once per run.

The server must outlive the pre-emption signals a launcher sends to the training process's group (torchrun and SLURM
signal the group; the trainer finishes its step and checkpoints, see `pace.train.stop_signals`): it is started with
them blocked, which it and the workers it forks inherit, and each worker unblocks them once it is in a process group
of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext
from multiprocessing.reduction import ForkingPickler

# Signals a launcher sends to the training process's group, which the fork server must not die of. SIGINT is
# here for the window before the server ignores it itself.
GROUP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

# What a worker runs: imported once in the server, so a forked worker starts with it loaded.
_PRELOAD = ["pace.data.loader", "pace.eval.folders"]


def worker_context() -> BaseContext:
    """The multiprocessing context for a DataLoader's workers: the fork server, started if it is not running.

    Call it again before each pass that starts workers (`start_worker_server`): a server that died is restarted
    there with the group signals blocked, where `Process.start` would restart it without.

    Returns:
        The "forkserver" context; pass it as `DataLoader(multiprocessing_context=...)` with
        `worker_init_fn=init_worker`.
    """
    start_worker_server()
    return multiprocessing.get_context("forkserver")


def start_worker_server() -> None:
    """Start the fork server with the group signals blocked, unless it is running (then this costs a `waitpid`)."""
    forkserver.set_forkserver_preload(_PRELOAD)
    # The mask is inherited through the server's fork and exec. A signal that arrives meanwhile stays pending
    # and reaches this process when the mask is restored: nothing is lost.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        # The server's start first starts multiprocessing's resource tracker, which unblocks SIGINT and SIGTERM
        # once its own process runs (rather than restoring the mask). Started here, it is a no-op inside the
        # server's start, and the mask is set again for the server.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def init_worker(worker_id: int) -> None:
    """A worker's first step: a process group of its own, then the signals the server blocked unblocked.

    In its own group a worker outlives the launcher's signal to the training process's group while the training
    process finishes its step and checkpoints. The training process still stops it, and when the training process
    dies the server exits and the loader's watchdog ends the worker. Unblocked, the loader's own SIGTERM
    (`DataLoader` shutdown) stops it.

    Args:
        worker_id: the DataLoader's worker index (unused).
    """
    os.setpgrp()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


def check_sendable(dataset: object) -> None:
    """Fail before any work starts when `dataset` cannot travel to a worker (it is pickled there each pass).

    Without this a lambda or closure in a transform fails at the loader's first pass, which for an evaluation
    loader comes after a whole training epoch.

    Raises:
        ValueError: naming what could not be pickled.
    """
    try:
        ForkingPickler.dumps(dataset)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise ValueError(
            f"num_workers > 0 sends the dataset and its transforms to the worker processes pickled, and this one "
            f"cannot be ({e}): use module-level functions or functools.partial instead of lambdas and closures, or "
            "num_workers=0"
        ) from e
