"""`pace-train`: the Hydra entry point. Everything it does is in `run`; the config tree is `configs/`.

The config tree ships inside the package as `pace/configs` (a link to the top-level `configs/` in a source
checkout, a copied folder in an installed wheel), so the same absolute path works in both.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pace.distributed import DistEnv, all_gather_object, process_group, resolve_dist_env
from pace.errors import RunError, describe, exit_on_stop_signals, run_cli, user_errors
from pace.failed_start import discard_failed_start, remember_new_directories
from pace.train.assemble import build_trainer
from pace.train.config import TrainConfig, register_configs, validate
from pace.train.run_lock import RunLock
from pace.train.trainer import EXIT_REQUEUE, PreemptedError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

log = logging.getLogger(__name__)


def _take_run_dir(lock: RunLock, env: DistEnv) -> None:
    # Rank 0 takes the lock; every rank learns the outcome, so a refused job stops on all ranks at once.
    refusal = None
    if env.is_main:
        try:
            lock.acquire()
        except RunError as e:
            refusal = str(e)
    refusal = all_gather_object(refusal, env)[0]
    if refusal is not None:
        raise RunError(refusal)


def run(cfg: DictConfig) -> int:
    """Validate the composed config, train, evaluate; return the process exit code.

    A user error (see `pace.errors.describe`) is also written to the log (`train.log`) before it propagates.

    Args:
        cfg: the composed Hydra config.

    Returns:
        0 when training finished, `EXIT_REQUEUE` (75) after a SIGTERM/SIGUSR1 checkpoint.
    """
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    lock: RunLock | None = None
    try:
        config = validate(cfg)
        lock = RunLock(config.run_dir or output_dir)
        remember_new_directories(lock.path.parent)  # an explicit `run_dir` is created by the lock
        return _run(cfg, config, lock)
    except Exception as e:
        described = describe(e, TrainConfig)
        if described is not None:
            log.error("%s", described[0])
        raise
    finally:
        if lock is not None:
            lock.release()
            discard_failed_start(lock.path.parent)
        discard_failed_start(output_dir)


def _run(cfg: DictConfig, config: TrainConfig, lock: RunLock) -> int:
    if config.run_dir is None:
        config.run_dir = HydraConfig.get().runtime.output_dir
    if config.trainer.cpu_threads is not None:
        torch.set_num_threads(config.trainer.cpu_threads)
    env = resolve_dist_env()
    options = config.trainer
    with process_group(env, options.device, options.collective_timeout_s, options.rendezvous_timeout_s) as device:
        if device.type == "cuda":
            # TF32 matmuls and cuDNN autotuning: the usual speed settings for vision training on Ampere and later.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        resolved["run_dir"] = config.run_dir
        trainer = None
        try:
            _take_run_dir(lock, env)
            trainer = build_trainer(config, env=env, device=device, resolved=resolved)
            results = trainer.fit()
        except PreemptedError as stop:
            log.warning("%s; exit %d, rerun the same command to resume", stop, EXIT_REQUEUE)
            return EXIT_REQUEUE
        finally:
            if trainer is not None:
                trainer.metrics.close()
    chance = 100.0 / config.model.num_classes
    for key, value in results.items():
        if key.endswith("/top1"):
            count = results[f"{key}_count"]
            log.info("%s: top-1 %.2f%% on %d images (chance %.2f%%)", key.removesuffix("/top1"), value, count, chance)
    return 0


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("pace-train", TrainConfig):
        code = run(cfg)
    if code:
        sys.exit(code)


def main() -> None:
    """Console entry point: register the config schemas, then let Hydra parse the command line.

    A user error ends the command with one line on stderr and exit code 2 (config, command line) or 1.
    """
    exit_on_stop_signals()
    register_configs()
    run_cli(_hydra_main, "pace-train", TrainConfig)


if __name__ == "__main__":
    main()
