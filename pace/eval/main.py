"""`pace-eval`: the Hydra entry point. Everything it does is in `run`; the config is `configs/eval.yaml`, read
from the tree shipped inside the package (`pace/configs`, as for `pace-train`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import hydra
import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import pace
from pace.data import create_eval_transform
from pace.distributed import DistEnv, capped_workers, process_group, resolve_dist_env
from pace.errors import run_cli, user_errors
from pace.eval.config import EvalConfig, register_configs, validate
from pace.eval.evaluators import build_evaluators
from pace.eval.loading import LoadedModel, load_model, sha256_file
from pace.eval.report import format_table, log_wandb, write_results
from pace.eval.rescore import rescore
from pace.eval.sweep import point_name, transform_points
from pace.eval.transform import eval_data_config
from pace.eval.tta import FlipTTA
from pace.failed_start import discard_failed_start

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

log = logging.getLogger(__name__)


def _model_record(loaded: LoadedModel, config: EvalConfig) -> dict[str, Any]:
    return {
        "name": loaded.name,
        "source": loaded.source,
        "weights": loaded.weights,
        "checkpoint": config.model.checkpoint,
        "files": [str(p) for p in loaded.files],
        "sha256": {str(p): sha256_file(p) for p in loaded.files},
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "kwargs": dict(config.model.kwargs),
        **loaded.info,
    }


def _environment(env: DistEnv, device: torch.device, config: EvalConfig) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "world_size": env.world_size,
        "launcher": env.launcher,
        "device": f"{device} ({name})",
        "amp": config.amp,
        "channels_last": config.channels_last,
        "batch_size_per_process": config.data.batch_size,
        "versions": {"pace": pace.__version__, "torch": torch.__version__, "timm": timm.__version__},
    }


def _log_interval(samples: int | None, global_batch: int, lines: int = 10) -> int:
    # About ten progress lines per pass (every 50 batches when the size is unknown).
    if samples is None:
        return 50
    return max(1, math.ceil(samples / global_batch) // lines)


def _evaluate_model(config: EvalConfig, env: DistEnv, device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(config.seed)  # weights that no checkpoint sets are drawn alike on every rank
    loaded = load_model(
        config.model.name,
        checkpoint=config.model.checkpoint,
        pretrained=config.model.pretrained,
        weights=config.model.weights,
        model_kwargs=config.model.kwargs,
        sketch_seed=config.model.sketch_seed,
    )
    model = loaded.model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = FlipTTA(model) if config.test_time.flip else model
    test_time = config.test_time
    points = transform_points(dataclasses.asdict(config.transform), test_time.input_sizes, test_time.crop_pcts)
    sections, transforms = {}, {}
    for overrides in points:
        data_config = eval_data_config(model, overrides)
        sections.update(_evaluate_point(config, env, device, loaded.name, net, data_config, named=len(points) > 1))
        transforms[point_name("", data_config)[1:]] = data_config
    record = {
        "model": _model_record(loaded, config) if env.is_main else {"name": loaded.name},
        "transform": data_config if len(points) == 1 else transforms,
        "test_time": dataclasses.asdict(config.test_time),
        "evaluators": sections,
        "environment": _environment(env, device, config),
        "seconds": time.perf_counter() - start,
    }
    return record


def _evaluate_point(config, env, device, model_name, net, data_config, *, named: bool) -> dict[str, Any]:
    # One resolution and crop: every evaluator, named `<evaluator>@<size>px/crop<pct>` when several points run.
    evaluators = build_evaluators(
        config.eval,
        create_eval_transform(**data_config),
        env=env,
        batch_size=config.data.batch_size,
        num_workers=capped_workers(config.data.num_workers, env),
        pin_memory=device.type == "cuda",
    )
    sections = {}
    for evaluator in evaluators:
        name = point_name(evaluator.name, data_config) if named else evaluator.name
        log.info("evaluating %s on %s", model_name, evaluator.data.description)
        suffix = ".jsonl.gz" if config.predictions_logits else ".jsonl"
        stem = name.replace("/", "_").replace("@", "_")
        predictions = Path(config.output_dir) / f"predictions_{stem}{suffix}" if config.predictions else None
        result = evaluator.run(
            net,
            device=device,
            amp_dtype=config.amp,
            channels_last=config.channels_last,
            env=env,
            predictions_path=predictions,
            keep_logits=config.predictions_logits,
            log_every=_log_interval(evaluator.data.expected_samples, config.data.batch_size * env.world_size),
        )
        sections[name] = {
            "data": {
                "description": evaluator.data.description,
                **dataclasses.asdict(evaluator.cfg),
            },
            "transform": data_config,
            "metrics": result.metrics,
            "counts": result.counts,
            "timing": result.timing(),
            "predictions": None if predictions is None else str(predictions),
        }
    return sections


def _rescore(config: EvalConfig) -> dict[str, Any]:
    name, entry = next(iter(config.eval.items()))
    section = rescore(
        config.rescore,
        labels=entry.labels,
        topk=entry.topk,
        expected_samples=entry.num_samples,
        allow_partial=entry.partial,
    )
    section["data"] = {"description": f"predictions file {config.rescore}", "labels": dict(entry.labels)}
    return {
        "model": {"name": None, "source": "predictions", "files": [config.rescore]},
        "transform": None,
        "evaluators": {name: section},
        "environment": {"versions": {"pace": pace.__version__}},
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate the composed config, evaluate (or re-score), and write `results.json` in the output dir.

    Args:
        cfg: the composed Hydra config.

    Returns:
        The results record (the content of `results.json`), the same on every rank.
    """
    try:
        return _run(cfg)
    except Exception:
        if HydraConfig.initialized():  # under pace-eval, not when a composed config is passed in
            discard_failed_start(Path(HydraConfig.get().runtime.output_dir))
        raise


def _run(cfg: DictConfig) -> dict[str, Any]:
    config = validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    env = resolve_dist_env()
    if config.rescore:
        record = _rescore(config)
    else:
        with process_group(env, config.device) as device:
            record = _evaluate_model(config, env, device)
    record["config"] = resolved
    if env.is_main:
        path = write_results(Path(config.output_dir) / "results.json", record)
        print(format_table(record["evaluators"]))
        log.info("results written to %s", path)
        if config.logger.wandb:
            log_wandb(
                record,
                mode=config.logger.mode,
                project=config.logger.project,
                entity=config.logger.entity,
                tags=list(config.logger.tags),
                directory=config.output_dir,
            )
    return record


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors("pace-eval", EvalConfig):
        run(cfg)


def main() -> None:
    """Console entry point: register the config schemas, then let Hydra parse the command line."""
    register_configs()
    run_cli(_hydra_main, "pace-eval", EvalConfig)


if __name__ == "__main__":
    main()
