"""Evaluators declared in config (the `eval` group): each opens its data once and runs `evaluate` on demand, so
pace-eval and the Trainer's periodic evaluation are the same code path.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn

from pace.distributed import DistEnv, resolve_dist_env
from pace.eval.classify import EvalResult, evaluate
from pace.eval.config import IMAGENET_REAL, TARGETS, EvaluatorConfig
from pace.eval.datasets import EvalData, open_eval_data
from pace.eval.knn import knn_evaluate
from pace.eval.labels import LabelSets
from pace.eval.robustness import class_subset, score_corruptions

log = logging.getLogger(__name__)


def resolve_labels(labels: Mapping[str, str]) -> tuple[str | None, dict[str, LabelSets]]:
    """Split an evaluator's `labels` into the metric group of the samples' own labels and the label sets.

    Args:
        labels: metric group -> `targets`, `imagenet_real` or a JSON file of label sets.
    """
    targets_name, sets = None, {}
    for group, source in labels.items():
        if source == TARGETS:
            targets_name = group
        elif source == IMAGENET_REAL:
            sets[group] = LabelSets.imagenet_real()
        else:
            sets[group] = LabelSets.from_json(source, name=group)
    return targets_name, sets


class Evaluator:
    """One configured evaluator with its data opened for this rank.

    Args:
        name: the entry's name in the `eval` group.
        cfg: the entry.
        data: its opened data.
    """

    def __init__(self, name: str, cfg: EvaluatorConfig, data: EvalData, memory_bank: EvalData | None = None):
        self.name = name
        self.cfg = cfg
        self.data = data
        self.memory_bank = memory_bank
        self.targets_name, self.label_sets = resolve_labels(cfg.labels)
        self.class_subset = class_subset(cfg.class_subset) if cfg.class_subset else None
        if cfg.kind == "knn" and memory_bank is None:
            raise ValueError(f"evaluator {name}: k-NN needs its memory bank (knn_train_path), and this data has none")

    def __repr__(self) -> str:
        return f"Evaluator({self.name!r}, {self.data.description}, labels={dict(self.cfg.labels)})"

    def due(self, epochs_done: int, *, last: bool = False) -> bool:
        """Whether training should run this evaluator after `epochs_done` epochs (always after the last)."""
        return last or epochs_done % self.cfg.every_n_epochs == 0

    def run(
        self,
        model: nn.Module,
        *,
        device,
        amp_dtype=None,
        channels_last: bool = False,
        env: DistEnv | None = None,
        predictions_path: str | Path | None = None,
        keep_logits: bool = False,
        limit_batches: int | None = None,
        log_every: int = 0,
    ) -> EvalResult:
        """Evaluate `model`; the same on every rank. Arguments as in `pace.eval.evaluate`."""
        options = {"device": device, "amp_dtype": amp_dtype, "channels_last": channels_last, "env": env}
        if self.cfg.kind == "knn":
            return self._run_knn(model, limit_batches=limit_batches, **options)
        corruptions = self.cfg.kind == "corruptions"
        result = evaluate(
            model,
            self.data.loader,
            topk=tuple(self.cfg.topk),
            name=None if corruptions else self.targets_name,
            label_sets={} if corruptions else self.label_sets,
            num_classes=self.data.num_classes,
            expected_samples=self.data.expected_samples,
            allow_partial=self.cfg.partial,
            predictions_path=predictions_path,
            keep_logits=keep_logits,
            limit_batches=limit_batches,
            log_every=log_every,
            class_subset=self.class_subset,
            **options,
        )
        if corruptions:
            metrics, counts = score_corruptions(
                result.predictions,
                name=self.targets_name or self.name,
                topk=tuple(self.cfg.topk),
                baseline_errors=self.cfg.baseline_errors,
            )
            result.metrics, result.counts = metrics, {**counts, "repeats_dropped": result.counts["repeats_dropped"]}
        return result

    def _run_knn(self, model: nn.Module, **options) -> EvalResult:
        return knn_evaluate(
            model,
            self.memory_bank.loader,
            self.data.loader,
            num_classes=self.data.num_classes or self.memory_bank.num_classes,
            k=self.cfg.knn_k,
            temperature=self.cfg.knn_temperature,
            topk=tuple(self.cfg.topk),
            name=self.targets_name or self.name,
            label_sets=self.label_sets,
            allow_partial=self.cfg.partial,
            **options,
        )


def build_evaluators(
    entries: Mapping[str, EvaluatorConfig],
    transform: Callable,
    *,
    env: DistEnv | None = None,
    batch_size: int = 128,
    num_workers: int = 4,
    pin_memory: bool = False,
) -> list[Evaluator]:
    """Open every evaluator whose data path is set (entries without one are skipped and logged).

    Args:
        entries: evaluator name -> entry (see `pace.eval.config.evaluators_from_config`).
        transform: the eval transform shared by all evaluators.
        env: this process's place in the job, which loads its share of each dataset (None: `resolve_dist_env()`).
        batch_size: per-rank batch size.
        num_workers: loader workers per rank.
        pin_memory: pin host memory (for CUDA).
    """
    options = {
        "env": resolve_dist_env() if env is None else env,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "pin_memory": pin_memory,
    }
    evaluators = []
    for name, cfg in entries.items():
        if not cfg.path:
            log.info("evaluator %s: no data path, skipped", name)
            continue
        data = open_eval_data(cfg, transform, **options)
        bank = None
        if cfg.kind == "knn":
            bank_cfg = dataclasses.replace(
                cfg, path=cfg.knn_train_path, split=cfg.knn_train_split, num_samples=None, label_file=None
            )
            bank = open_eval_data(bank_cfg, transform, **options)
        evaluators.append(Evaluator(name, cfg, data, bank))
    return evaluators
