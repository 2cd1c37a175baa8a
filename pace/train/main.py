"""`pace-train`: the Hydra entry point. Everything it does is in `run`; the config tree is `configs/`.

The config tree ships inside the package as `pace/configs` (a link to the top-level `configs/` in a source
checkout, a copied folder in an installed wheel), so the same absolute path works in both.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pace.distributed import destroy_distributed, init_distributed, resolve_dist_env, select_device
from pace.train.assemble import build_trainer
from pace.train.config import register_configs, validate
from pace.train.trainer import EXIT_REQUEUE, PreemptedError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> int:
    """Validate the composed config, train, evaluate; return the process exit code.

    Args:
        cfg: the composed Hydra config.

    Returns:
        0 when training finished, `EXIT_REQUEUE` (75) after a SIGTERM/SIGUSR1 checkpoint.
    """
    config = validate(cfg)
    if config.run_dir is None:
        config.run_dir = HydraConfig.get().runtime.output_dir
    if config.trainer.cpu_threads is not None:
        torch.set_num_threads(config.trainer.cpu_threads)
    env = resolve_dist_env()
    device = select_device(env, config.trainer.device)
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    init_distributed(env, device)
    if device.type == "cuda":
        # TF32 matmuls and cuDNN autotuning: the usual speed settings for vision training on Ampere and later.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["run_dir"] = config.run_dir
    trainer = None
    try:
        trainer = build_trainer(config, env=env, device=device, resolved=resolved)
        results = trainer.fit()
    except PreemptedError as stop:
        log.warning("%s; exit %d, rerun the same command to resume", stop, EXIT_REQUEUE)
        return EXIT_REQUEUE
    finally:
        if trainer is not None:
            trainer.metrics.close()
        destroy_distributed()
    chance = 100.0 / config.model.num_classes
    for key, value in results.items():
        if key.endswith("/top1"):
            count = results[f"{key}_count"]
            log.info("%s: top-1 %.2f%% on %d images (chance %.2f%%)", key.removesuffix("/top1"), value, count, chance)
    return 0


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


def main() -> None:
    """Console entry point: register the config schemas, then let Hydra parse the command line."""
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
