"""User errors of the command-line tools: one clear line on stderr, no traceback, a meaningful exit code.

`run_cli` wraps a Hydra entry point. A mistake the user can fix (a config key or value, a missing path, an
unreadable checkpoint, a full disk) prints `<prog>: error: <one line>` and exits 2 for usage errors (the
command line or config) or 1 otherwise. Anything else is a bug and keeps its traceback. `HYDRA_FULL_ERROR=1`
shows every traceback, as in any Hydra application.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

# sysexits-style: 2 is what argparse returns for a bad command line.
EXIT_USAGE = 2
EXIT_ERROR = 1
# sysexits' EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 (pre-emption); rerun the same command to continue.
EXIT_REQUEUE = 75


class UsageError(ValueError):
    """A config key or value, or a command-line argument, that the user must change."""


class RunError(RuntimeError):
    """A problem with the run's files or environment, described in one line for the user."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def no_space_message(exc: OSError, path: Any = None) -> str:
    """`no space left on device writing <path>` for an ENOSPC / EDQUOT error.

    Args:
        exc: the error.
        path: the file being written, when the error does not name it.
    """
    where = exc.filename or path
    return f"no space left on device writing {where}" if where else "no space left on device"


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` is a disk-full or quota error."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass config schema (`optim.lr`, `trainer.ema`, ...).

    Args:
        schema: a dataclass type.
        prefix: the dotted path of `schema` itself.
    """
    keys: list[str] = []
    hints = get_type_hints(schema)
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], f"{key}.")
    return keys


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    """` (did you mean optim.lr?)` for the closest known keys, or an empty string.

    A key is close when its whole dotted name or its last part is (a typo, or the right name under the wrong
    section: `trainer.lr` -> `optim.lr`).

    Args:
        key: the unknown dotted key.
        candidates: the keys that exist.
    """
    leaf = key.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        part = difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio()
        return max(whole, part)

    candidates = list(candidates)
    sections = {c.rsplit(".", 1)[0] for c in candidates if "." in c}
    leaves = [c for c in candidates if c != key and c not in sections]
    ranked = sorted(((score(c), c) for c in leaves), key=lambda sc: (-sc[0], sc[1]))
    close = [c for sc, c in ranked if sc >= 0.8][:3]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _one_line(text: str) -> str:
    # Hydra and OmegaConf add `full_key:` / `object_type=` detail lines; the key is already in the message.
    lines = [line.strip() for line in str(text).splitlines()]
    kept = []
    for line in lines:
        if line.startswith("Config search path"):
            break  # Hydra's list of config folders follows
        if line and not re.match(r"(full_key|reference_type|object_type)\b", line):
            kept.append(line)
    return "; ".join(kept).replace(":;", ":")


def _hydra_message(exc: BaseException, schema: type | None) -> str | None:
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if not isinstance(exc, (HydraException, OmegaConfBaseException)):
        return None
    unknown = (ConfigKeyError, ConfigAttributeError)
    cause = exc if isinstance(exc, unknown) else exc.__cause__
    if isinstance(cause, unknown) and getattr(cause, "full_key", None):
        hint = did_you_mean(cause.full_key, schema_keys(schema)) if schema is not None else ""
        return f"unknown config key {cause.full_key}{hint}"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else None
    if cause is not None and getattr(cause, "full_key", None):
        return f"config key {cause.full_key}: {_one_line(cause.msg if hasattr(cause, 'msg') else cause)}"
    if getattr(exc, "full_key", None):
        return f"config key {exc.full_key}: {_one_line(getattr(exc, 'msg', exc))}"
    return _one_line(exc)


def _path_message(exc: OSError) -> str:
    # An OSError in its default form ("[Errno 17] File exists: 'runs/x'", from a mkdir or open) says what failed
    # but not why; a message of our own (a single string argument) is kept as it is.
    if exc.filename is None or len(exc.args) != 2:
        return _one_line(exc)
    path = Path(os.fsdecode(exc.filename))
    if isinstance(exc, FileExistsError) and not path.is_dir():
        return f"{path} is a file where a directory is needed: remove it or choose another path"
    if isinstance(exc, NotADirectoryError):
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"cannot create {path}: {blocking} is a file where a directory is needed"
    return f"{exc.strerror}: {path}"


def describe(exc: BaseException, schema: type | None = None) -> tuple[str, int] | None:
    """The one line and exit code for a user error, or None for a bug (which keeps its traceback).

    Args:
        exc: the exception that ended the command.
        schema: the config schema, to suggest known keys for an unknown one.
    """
    hydra = _hydra_message(exc, schema)
    if hydra is not None:
        return hydra, EXIT_USAGE
    if isinstance(exc, UsageError):
        return _one_line(exc), EXIT_USAGE
    if is_no_space(exc):
        return no_space_message(exc), EXIT_ERROR  # type: ignore[arg-type]
    if isinstance(exc, _PATH_ERRORS):
        return _path_message(exc), EXIT_ERROR
    if isinstance(exc, (RunError, ValueError)):
        return _one_line(exc), EXIT_ERROR
    return None


# Set by the first stop signal during start-up (see `exit_on_stop_signals`).
_stopping = False
# When outside the training loop such a signal arrived, for its one line (see `set_stop_phase`).
_phase = "during start-up, before training began"


def _stop_during_startup(signum: int, frame: Any) -> None:
    global _stopping
    if _stopping:
        # Already leaving. A second signal (SLURM signals every process of the step, and torchrun forwards its own
        # copy) must not cut short the clean-up that releases the run directory's lock.
        return
    _stopping = True
    name = signal.Signals(signum).name
    # os.write, not print: the signal may arrive while the main thread holds sys.stderr's buffer lock.
    os.write(2, f"pace-train: stopped by {name} {_phase}: exit {EXIT_REQUEUE}\n".encode())
    sys.exit(EXIT_REQUEUE)


def set_stop_phase(phase: str) -> None:
    """Say what a stop signal outside the training loop interrupts (the loop's own handler saves a checkpoint).

    Args:
        phase: completes "pace-train: stopped by SIGTERM ...", e.g. "after the last checkpoint".
    """
    global _phase
    _phase = phase


def exit_on_stop_signals() -> None:
    """Make SIGTERM/SIGUSR1 exit with code 75 until the training loop installs its own checkpointing handler.

    A job pre-empted while it starts has nothing to save, but the launcher must still see "requeue me". The
    console script (`pace_cli.train`) installs the same behaviour before `pace` and torch are imported.
    """
    global _stopping, _phase
    _stopping = False
    _phase = "during start-up, before training began"
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, _stop_during_startup)


# Whether the user asked for full tracebacks (HYDRA_FULL_ERROR=1 before `run_cli` set it for its own use).
_show_tracebacks = False


def exit_on_user_error(exc: BaseException, prog: str, schema: type | None = None) -> None:
    """Print `<prog>: error: <one line>` and exit with its code when `exc` is a user error; return otherwise.

    Args:
        exc: the exception that ended the command.
        prog: the command's name, printed before the message.
        schema: the config schema (for "did you mean" suggestions).
    """
    described = None if _show_tracebacks else describe(exc, schema)
    if described is None:
        return
    message, code = described
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors(prog: str, schema: type | None = None) -> Iterator[None]:
    """Inside a Hydra task function: end the process on a user error before Hydra sees it.

    Hydra writes "Error executing job with overrides: [...]" for every exception that leaves the task function;
    `SystemExit` is not an `Exception`, so exiting here keeps the user's stderr to the one line.

    Args:
        prog: the command's name.
        schema: the config schema (for "did you mean" suggestions).
    """
    try:
        yield
    except Exception as exc:
        exit_on_user_error(exc, prog, schema)
        raise


def run_cli(entry: Callable[[], Any], prog: str, schema: type | None = None) -> None:
    """Run a Hydra entry point, turning user errors into one line on stderr and an exit code.

    Errors inside the task function are handled there (`user_errors`); this catches the ones Hydra raises
    while it composes the config, before the task runs.

    Args:
        entry: the `@hydra.main` function.
        prog: the command's name, printed before the message.
        schema: the config schema (for "did you mean" suggestions).
    """
    global _show_tracebacks
    _show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra re-raises instead of printing its own shortened traceback; we decide what the user sees.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        entry()
    except Exception as exc:
        exit_on_user_error(exc, prog, schema)
        raise
