"""Run identity: which checkpoint a command resumes, and whether it may.

The run directory comes from `name=` alone, so a rerun with another lr, schedule or model would silently continue
the old state. Every checkpoint stores the resolved config and a hash of its run-defining part; before anything is
built, the resumed checkpoint's config is compared with the command's and a difference stops the command with one
line naming the keys (`trainer.resume=force` continues anyway). Keys that do not change what the run computes, or
that a resumed run changes by design (more epochs, logging, evaluation cadence, data location), are left out.

The newest checkpoint is read before it is chosen: an unreadable one (a truncated copy, a disk that filled) is
set aside as `<name>.corrupt` with a warning and the previous intact one is resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pace.errors import RunError, UsageError
from pace.train.checkpoint import CheckpointManager, load_checkpoint

log = logging.getLogger(__name__)

# Dotted keys (or whole sections) a resumed run may change. `sched.epochs` extends the run: the restored
# scheduler keeps the length it was built with, so the extra epochs run at `sched.min_lr`.
RESUMABLE_KEYS = (
    "name",
    "run_dir",
    "logger",
    "eval",
    "sched.epochs",
    "model.pretrained",
    "data.root",
    "data.num_workers",
    "data.eval_batch_size",
    "trainer.device",
    "trainer.compile",
    "trainer.compile_scope",
    "trainer.compile_mode",
    "trainer.resume",
    "trainer.log_every_steps",
    "trainer.telemetry_every_steps",
    "trainer.telemetry_images",
    "trainer.progress_bar",
    "trainer.ckpt_every_steps",
    "trainer.keep_last",
    "trainer.keep_best",
    "trainer.best_metric",
    "trainer.eval_ema",
    "trainer.limit_eval_batches",
    "trainer.on_nonfinite",
    "trainer.max_nonfinite_skips",
    "trainer.export_release",
    "trainer.peak_tflops",
    "trainer.cpu_threads",
    # Fault-injection switches of earlier versions (now `pace.train.faults`), still in older checkpoints' configs.
    "trainer.debug_nan_step",
    "trainer.debug_nan_rank",
    "trainer.rendezvous_timeout_s",
    "trainer.collective_timeout_s",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUMABLE_KEYS)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The run-defining part of a resolved config, as flat dotted keys.

    Args:
        config: the resolved training config (plain containers).
    """
    return {k: v for k, v in _flatten(config).items() if not _resumable(k)}


def config_hash(config: dict[str, Any]) -> str:
    """A short sha256 of the run-defining config (stored in every checkpoint as `config_hash`).

    Args:
        config: the resolved training config.
    """
    text = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The run-defining keys whose values differ: (key, saved value, current value), sorted by key.

    Args:
        saved: the config stored in the checkpoint.
        current: this command's config.
    """
    a, b = identity(saved), identity(current)
    missing = object()
    return [
        (k, a.get(k, "<absent>"), b.get(k, "<absent>"))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def check_identity(path: Path, checkpoint: dict[str, Any], config: dict[str, Any], force: bool) -> None:
    """Refuse to resume `checkpoint` with a config whose run-defining keys differ (warn instead under `force`).

    Args:
        path: the checkpoint file (named in the message).
        checkpoint: its content (only `config` and `config_hash` are read).
        config: this command's resolved config.
        force: `trainer.resume=force`.

    Raises:
        UsageError: naming every differing key with both values.
    """
    saved = checkpoint.get("config")
    if not isinstance(saved, dict) or checkpoint.get("config_hash") == config_hash(config):
        return
    diff = differing_keys(saved, config)
    if not diff:
        return
    shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff[:6])
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    if force:
        log.warning("trainer.resume=force: resuming %s although the config differs: %s%s", path, shown, more)
        return
    raise UsageError(
        f"{path.parent.parent} holds a run with other settings ({shown}{more}): rerun with the run's settings, "
        f"choose a new name=..., or pass trainer.resume=force to continue it with these"
    )


def check_architecture(path: Path, checkpoint: dict[str, Any], model_name: str) -> None:
    """Refuse a checkpoint of another architecture in one line naming both.

    Args:
        path: the checkpoint file.
        checkpoint: its content.
        model_name: the architecture this run builds (`model.name`).

    Raises:
        RunError: the checkpoint holds another architecture.
    """
    saved = checkpoint.get("model_name")
    if saved is not None and saved != model_name:
        raise RunError(f"{path} holds a {saved!r} model, but this run builds model.name={model_name!r}")


def _readable(path: Path) -> tuple[dict[str, Any] | None, str]:
    # The checkpoint's content, or None and why it cannot be read.
    try:
        # mmap: only the pickled metadata is read here; the tensors are read when the Trainer loads it.
        return load_checkpoint(path, mmap=True), ""
    except Exception as e:  # a truncated zip, a torn pickle, an I/O error: all mean "not this one"
        return None, str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _refuse_a_second_run(checkpoints: CheckpointManager) -> None:
    # A new run in a directory that holds another one's checkpoints would interleave the two: its step files
    # among the old ones (the newest of which a later resume would pick), its records after theirs.
    earlier = checkpoints.step_files() or sorted(checkpoints.directory.glob("best.pt"))
    if earlier:
        raise UsageError(
            f"trainer.resume=never: {checkpoints.directory} holds the checkpoints of an earlier run (up to "
            f"{earlier[-1].name}) that a new run would mix with: choose another name=..., or delete "
            f"{checkpoints.directory} to start over"
        )


def select_checkpoint(
    checkpoints: CheckpointManager, resume: str, config: dict[str, Any], set_aside: bool
) -> Path | None:
    """The checkpoint this command resumes, after the identity and architecture checks (None: a fresh start).

    Args:
        checkpoints: the run's checkpoint folder.
        resume: `trainer.resume` ("auto", "force", "never" or a path).
        config: this command's resolved config.
        set_aside: rename unreadable checkpoints to `<name>.corrupt` (rank 0 only: the others just skip them).

    Raises:
        FileNotFoundError: an explicit `trainer.resume` path that does not exist.
        RunError: every checkpoint of the run is unreadable, or the checkpoint holds another architecture.
        UsageError: the run-defining config differs (see `check_identity`), or `never` in a run directory that
            holds checkpoints.
    """
    if resume == "never":
        _refuse_a_second_run(checkpoints)
        return None
    model_name = config["model"]["name"]
    if resume not in ("auto", "force"):
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"trainer.resume={resume!r}: no checkpoint at {path}")
        checkpoint, why = _readable(path)
        if checkpoint is None:
            raise RunError(f"trainer.resume={resume!r}: {path} is not a readable checkpoint")
        check_architecture(path, checkpoint, model_name)
        return path  # an explicit file: the user chose what to continue from
    candidates = checkpoints.step_files()[::-1]
    for path in candidates:
        checkpoint, why = _readable(path)
        if checkpoint is None:
            if set_aside:
                aside = path.rename(path.with_name(path.name + ".corrupt"))
                log.warning("checkpoint %s cannot be read (%s): set aside as %s", path, why, aside.name)
            else:
                log.warning("checkpoint %s cannot be read (%s)", path, why)
            continue
        check_architecture(path, checkpoint, model_name)
        check_identity(path, checkpoint, config, force=resume == "force")
        if path != candidates[0]:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        return path
    if candidates:
        raise RunError(f"no readable checkpoint in {checkpoints.directory} (all {len(candidates)} are damaged)")
    return None
